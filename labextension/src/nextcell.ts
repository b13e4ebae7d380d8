/**
 * A config form's Run button (llmops_jupyter/frontends/forms.py) asks for the equivalent `%llmops …` line in a new
 * cell below. Inside a cell execution IPython's `set_next_input` does that; a click in Lab reaches the kernel as a
 * widget message, where Jupyter offers no such reply, so the form displays this MIME type and this renderer
 * inserts the cell. It acts once per request and only while the request is fresh, so re-opening a saved notebook
 * never adds cells.
 */
import { JupyterFrontEnd } from '@jupyterlab/application';
import { IRenderMime } from '@jupyterlab/rendermime-interfaces';
import { Widget } from '@lumino/widgets';

export const NEXT_CELL_MIME = 'application/vnd.llmops.next-cell+json';
const FRESH_MS = 30_000;
const handled = new Set<string>();

interface INextCell {
  source: string;
  id: string;
  ts: number;
}

class NextCellRenderer extends Widget implements IRenderMime.IRenderer {
  constructor(private readonly app: JupyterFrontEnd) {
    super();
    this.addClass('llmops-next-cell');
  }

  async renderModel(model: IRenderMime.IMimeModel): Promise<void> {
    const data = model.data[NEXT_CELL_MIME] as unknown as INextCell | undefined;
    if (!data || handled.has(data.id) || Date.now() - data.ts > FRESH_MS) {
      return;
    }
    handled.add(data.id);
    await this.app.commands.execute('notebook:insert-cell-below');
    await this.app.commands.execute('notebook:replace-selection', { text: data.source });
  }
}

export function nextCellFactory(app: JupyterFrontEnd): IRenderMime.IRendererFactory {
  return {
    safe: true,
    mimeTypes: [NEXT_CELL_MIME],
    defaultRank: 0,
    createRenderer: () => new NextCellRenderer(app)
  };
}
