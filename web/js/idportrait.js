// Identity Portrait frontend extension. Plain ES module served from web/ (no build step).
import { app } from "../../../scripts/app.js";

app.registerExtension({
  name: "idportrait.core",
  async setup() {
    // A flag tests (and curious users) can read to know the extension loaded.
    window.__IDPORTRAIT_LOADED__ = true;
  },
});
