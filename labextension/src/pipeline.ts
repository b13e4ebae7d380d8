/**
 * "Run as pipeline": a form generated from the notebook's `parameters` cell (typed by the server), then a POST to
 * /llmops/pipeline. Progress and the links to the output notebook and run appear in the sidebar and in a
 * notification.
 */
import { Dialog, Notification, showDialog, showErrorMessage } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';

import { api, ApiError, IJob, IParam } from './api';
import { h } from './format';

/** The dialog body: one typed input per parameter. */
export class ParameterForm extends Widget {
  private readonly inputs = new Map<string, HTMLInputElement | HTMLTextAreaElement>();

  constructor(
    readonly notebook: string,
    readonly params: IParam[]
  ) {
    super();
    this.addClass('llmops-param-form');
    const table = h('table', {});
    for (const p of params) {
      let input: HTMLInputElement | HTMLTextAreaElement;
      if (p.type === 'bool') {
        input = h('input', { type: 'checkbox' });
        input.checked = Boolean(p.default);
      } else if (p.type === 'int' || p.type === 'float') {
        input = h('input', { type: 'number', step: p.type === 'int' ? '1' : 'any', class: 'jp-mod-styled' });
        input.value = p.default === null || p.default === undefined ? '' : String(p.default);
      } else if (p.type === 'str') {
        input = h('input', { type: 'text', class: 'jp-mod-styled' });
        input.value = p.default === null || p.default === undefined ? '' : String(p.default);
      } else {
        input = h('textarea', { rows: '2', class: 'jp-mod-styled' });
        input.value = JSON.stringify(p.default);
      }
      input.name = p.name;
      input.dataset.type = p.type;
      this.inputs.set(p.name, input);
      table.append(
        h(
          'tr',
          { title: p.help },
          h('th', {}, h('label', {}, p.name)),
          h('td', { class: 'llmops-param-type' }, p.type),
          h('td', {}, input)
        )
      );
    }
    this.node.append(h('div', { class: 'llmops-param-nb' }, notebook), table);
    if (!params.length) {
      this.node.append(h('div', { class: 'llmops-empty' }, 'The parameters cell defines no parameters.'));
    }
  }

  /** Typed values of the fields that differ from the defaults; throws with the field name on bad input. */
  getValue(): Record<string, unknown> {
    const out: Record<string, unknown> = {};
    for (const p of this.params) {
      const input = this.inputs.get(p.name)!;
      let value: unknown;
      if (p.type === 'bool') {
        value = (input as HTMLInputElement).checked;
      } else if (p.type === 'int' || p.type === 'float') {
        value = Number(input.value);
        if (input.value.trim() === '' || !isFinite(value as number) || (p.type === 'int' && !Number.isInteger(value))) {
          throw new Error(`Parameter '${p.name}' must be ${p.type === 'int' ? 'a whole number' : 'a number'}.`);
        }
      } else if (p.type === 'str') {
        value = input.value;
      } else {
        try {
          value = JSON.parse(input.value);
        } catch {
          throw new Error(`Parameter '${p.name}' must be JSON (got ${input.value}).`);
        }
      }
      if (JSON.stringify(value) !== JSON.stringify(p.default)) {
        out[p.name] = value;
      }
    }
    return out;
  }
}

/** Ask for parameters, start the job; returns it (or null when cancelled). */
export async function runAsPipeline(path: string): Promise<IJob | null> {
  let params: IParam[];
  try {
    params = (await api.parameters(path)).parameters;
  } catch (err) {
    await showErrorMessage('Run as pipeline', (err as ApiError).full ?? String(err));
    return null;
  }
  const form = new ParameterForm(path, params);
  const result = await showDialog<Record<string, unknown>>({
    title: 'Run as pipeline',
    body: form,
    buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Run' })],
    focusNodeSelector: 'input'
  });
  if (!result.button.accept) {
    return null;
  }
  if (result.value === null) {
    await showErrorMessage('Run as pipeline', 'Invalid parameters.');
    return null;
  }
  try {
    return await api.startPipeline(path, result.value);
  } catch (err) {
    await showErrorMessage('Run as pipeline', (err as ApiError).full ?? String(err));
    return null;
  }
}

/** A notification that follows the job until it ends, then offers the output notebook and the run. */
export function notifyJob(job: IJob, openNotebook: (p: string) => void, showRun: (id: string) => void): void {
  const id = Notification.emit(`Pipeline ${job.notebook}: starting…`, 'in-progress', { autoClose: false });
  const timer = window.setInterval(async () => {
    let j: IJob;
    try {
      j = await api.job(job.id);
    } catch {
      return;
    }
    if (j.status === 'running') {
      Notification.update({ id, message: `Pipeline ${j.notebook}: cell ${j.done}/${j.total ?? '?'}` });
      return;
    }
    window.clearInterval(timer);
    const actions = [{ label: 'Open output', callback: () => openNotebook(j.output) }];
    if (j.run_id) {
      const runId = j.run_id;
      actions.push({ label: 'Show run', callback: () => showRun(runId) });
    }
    Notification.update({
      id,
      message: `Pipeline ${j.notebook}: ${j.status}${j.error ? ' — ' + j.error : ''}`,
      type: j.status === 'finished' ? 'success' : 'error',
      autoClose: j.status === 'finished' ? 8000 : false,
      actions
    });
  }, 1000);
}
