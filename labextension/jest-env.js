// jsdom has no fetch API; Jupyter's ServerConnection builds a Request and calls settings.fetch. Hand the
// jsdom window Node's own Request/Response/Headers (Node >= 18) so the real ServerConnection code runs.
// jsdom has no DragEvent either, which @lumino/dragdrop (loaded by @lumino/widgets) subclasses at import:
// a MouseEvent stands in, as in @jupyterlab/testutils' jest shim.
const { TestEnvironment } = require('jest-environment-jsdom');

class JsdomWithFetch extends TestEnvironment {
  constructor(config, context) {
    super(config, context);
    for (const name of ['fetch', 'Request', 'Response', 'Headers', 'AbortController', 'AbortSignal']) {
      this.global[name] = globalThis[name];
    }
    if (this.global.DragEvent === undefined) {
      this.global.DragEvent = class DragEvent extends this.global.MouseEvent {};
    }
  }
}

module.exports = JsdomWithFetch;
