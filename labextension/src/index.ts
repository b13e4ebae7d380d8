/**
 * llmops-jupyter for JupyterLab: a left sidebar (runs, lineage, resources) and a "Run as pipeline" command on
 * notebooks. Data comes from the jupyter-server routes in llmops_jupyter/server (same auth as Jupyter).
 */
import { ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, ToolbarButton } from '@jupyterlab/apputils';
import { DocumentRegistry, DocumentWidget } from '@jupyterlab/docregistry';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { LabIcon, runIcon } from '@jupyterlab/ui-components';
import { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import { Widget } from '@lumino/widgets';

// The sidebar is added at activation and the pipeline module is small: both load with the plugin, not lazily.
// eslint-disable-next-line jupyter/prefer-lazy-imports
import { DEFAULT_SETTINGS, IPanelSettings, LlmopsPanel } from './panel';
import { nextCellFactory } from './nextcell';
// eslint-disable-next-line jupyter/prefer-lazy-imports
import { notifyJob, runAsPipeline } from './pipeline';

const PLUGIN_ID = 'llmops-jupyter:plugin';

export namespace CommandIDs {
  export const openSidebar = 'llmops:open-sidebar';
  export const runAsPipeline = 'llmops:run-as-pipeline';
  export const refresh = 'llmops:refresh-runs';
}

const llmopsIcon = new LabIcon({
  name: 'llmops-jupyter:icon',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"><g class="jp-icon3" fill="#616161">' +
    '<circle cx="5" cy="5" r="2.6"/><circle cx="19" cy="5" r="2.6"/><circle cx="12" cy="12" r="2.6"/>' +
    '<circle cx="12" cy="20" r="2.6"/><path d="M6.3 6.6l4.4 4 .9-1-4.4-4zM17.7 6.6l-4.4 4-.9-1 4.4-4zM11.3 13h1.4v5h-1.4z"/>' +
    '</g></svg>'
});

function currentNotebookPath(app: JupyterFrontEnd): string | null {
  const widget = app.shell.currentWidget;
  if (widget instanceof DocumentWidget) {
    const path = widget.context.path;
    return path.endsWith('.ipynb') ? path : null;
  }
  return null;
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'Registry runs, lineage, resources and run-as-pipeline for llmops-jupyter.',
  autoStart: true,
  optional: [ISettingRegistry, ICommandPalette, ILayoutRestorer, IRenderMimeRegistry],
  activate: (
    app: JupyterFrontEnd,
    settingRegistry: ISettingRegistry | null,
    palette: ICommandPalette | null,
    restorer: ILayoutRestorer | null,
    rendermime: IRenderMimeRegistry | null
  ) => {
    if (rendermime) {
      rendermime.addFactory(nextCellFactory(app), 0); // config forms: the equivalent line in a new cell
    }
    const openNotebook = (path: string) => void app.commands.execute('docmanager:open', { path });
    const panel = new LlmopsPanel({ openNotebook });
    panel.title.icon = llmopsIcon;
    app.shell.add(panel, 'left', { rank: 650 });
    if (restorer) {
      restorer.add(panel, 'llmops-sidebar');
    }

    app.commands.addCommand(CommandIDs.openSidebar, {
      label: 'LLMOps: Show Runs Sidebar',
      describedBy: { args: { type: 'object', properties: {} } },
      execute: () => app.shell.activateById(panel.id)
    });
    app.commands.addCommand(CommandIDs.refresh, {
      label: 'LLMOps: Refresh Runs',
      describedBy: { args: { type: 'object', properties: {} } },
      execute: () => panel.refresh()
    });
    app.commands.addCommand(CommandIDs.runAsPipeline, {
      label: 'Run as pipeline',
      caption: 'Execute this notebook with papermill as a recorded, parameterised pipeline run',
      describedBy: {
        args: {
          type: 'object',
          properties: {
            path: { type: 'string', description: 'Notebook path (default: the current notebook)' }
          }
        }
      },
      icon: runIcon,
      isEnabled: () => true,
      execute: async args => {
        const path = (args.path as string | undefined) ?? currentNotebookPath(app);
        if (!path) {
          return;
        }
        const job = await runAsPipeline(path);
        if (job) {
          panel.trackJob(job);
          app.shell.activateById(panel.id);
          notifyJob(job, openNotebook, id => {
            app.shell.activateById(panel.id);
            void panel.select(id);
          });
        }
      }
    });
    if (palette) {
      for (const command of [CommandIDs.openSidebar, CommandIDs.refresh, CommandIDs.runAsPipeline]) {
        palette.addItem({ command, category: 'LLMOps' });
      }
    }

    // A toolbar button on every notebook.
    const extension: DocumentRegistry.WidgetExtension = {
      createNew: (widget: Widget, context: DocumentRegistry.Context) => {
        const button = new ToolbarButton({
          className: 'llmops-run-pipeline-button',
          label: 'Run as pipeline',
          icon: runIcon,
          tooltip: 'Run this notebook as a pipeline (papermill) with its parameters',
          onClick: () => void app.commands.execute(CommandIDs.runAsPipeline, { path: context.path })
        });
        if (widget instanceof DocumentWidget) {
          widget.toolbar.insertItem(10, 'llmopsRunAsPipeline', button);
        }
        return button;
      }
    };
    app.docRegistry.addWidgetExtension('Notebook', extension);

    if (settingRegistry) {
      settingRegistry
        .load(PLUGIN_ID)
        .then(settings => {
          const apply = () => panel.configure(settings.composite as unknown as Partial<IPanelSettings>);
          apply();
          settings.changed.connect(apply);
        })
        .catch(reason => {
          console.warn('llmops-jupyter: settings not loaded, using defaults', reason);
          panel.configure(DEFAULT_SETTINGS);
        });
    }
  }
};

export default plugin;
