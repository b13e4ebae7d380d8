// jsdom has no fetch API; Jupyter's ServerConnection builds a Request and calls settings.fetch. Hand the
// jsdom window Node's own Request/Response/Headers (Node >= 18) so the real ServerConnection code runs.
const { TestEnvironment } = require('jest-environment-jsdom');

class JsdomWithFetch extends TestEnvironment {
  constructor(config, context) {
    super(config, context);
    for (const name of ['fetch', 'Request', 'Response', 'Headers', 'AbortController', 'AbortSignal']) {
      this.global[name] = globalThis[name];
    }
  }
}

module.exports = JsdomWithFetch;
