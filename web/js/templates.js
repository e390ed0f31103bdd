// ComfyUI-Disentangle: the pack's workflows in ComfyUI's template browser with their titles,
// one-line descriptions and order (workflows/index.json, in the format of the frontend's own template
// index), instead of bare file names in folder order.
//
// The frontend (comfyui-frontend-package 1.27) lists a custom node pack's templates by file name only;
// it shows titles, descriptions and order for the categories of its core index. So this extension adds
// the pack's index as one more category of that index (its moduleName is the pack's folder, so the
// thumbnails <name>.jpg and the workflows load from the pack's own template route) and drops the pack
// from the name-only list. Without index.json nothing changes.
import { api } from "../../../scripts/api.js";
import { app } from "../../../scripts/app.js";

// This file is served at /extensions/<pack folder>/js/templates.js; the template route uses the same folder name.
const PACK = decodeURIComponent(new URL(import.meta.url).pathname.split("/")[2]);

let packIndex = null;
function loadPackIndex() {
  packIndex ??= fetch(api.apiURL(`/workflow_templates/${encodeURIComponent(PACK)}/index.json`))
    .then((r) => (r.ok ? r.json() : null))
    .then((index) => (Array.isArray(index) ? index.map((c) => ({ ...c, moduleName: PACK })) : null))
    .catch((e) => {
      console.warn(`[${PACK}] no template index:`, e);
      return null;
    });
  return packIndex;
}

const namesOnly = api.getWorkflowTemplates.bind(api);
api.getWorkflowTemplates = async function () {
  const byPack = await namesOnly();
  if (byPack && byPack[PACK] && (await loadPackIndex())) delete byPack[PACK];
  return byPack;
};

const coreIndex = api.getCoreWorkflowTemplates.bind(api);
api.getCoreWorkflowTemplates = async function () {
  let core = [];
  try {
    core = await coreIndex();
  } catch (e) {  // no comfyui-workflow-templates package: the core index is missing, ours still shows
    console.warn(`[${PACK}] ComfyUI's own template index is unavailable:`, e?.message ?? e);
  }
  const ours = await loadPackIndex();
  return ours ? [...(Array.isArray(core) ? core : []), ...ours] : core;
};

app.registerExtension({ name: "ComfyUI-Disentangle.Templates" });
