"""The web page served at ``/`` (submit a prompt, watch the progress, play the video) and the API
reference at ``/docs``.

Inline (no static folder) so it ships inside the package with no package-data setup, and nothing is
loaded from another origin: the service works with no internet, under a content policy that allows only
these pages' own inline script and style (``safety.security_headers``). The page uses only the public
API, same-origin; with an API key set, the browser asks for it once (HTTP Basic, any user name).
"""

import json
from html import escape

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>wanfast</title>
<style>
  body { font: 15px system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  textarea, input { font: inherit; box-sizing: border-box; }
  textarea { width: 100%; height: 5rem; }
  .row { display: flex; gap: .75rem; margin: .5rem 0; flex-wrap: wrap; }
  .row label { display: flex; flex-direction: column; font-size: 13px; }
  .row input { width: 8rem; }
  progress { width: 100%; height: 1rem; }
  video { width: 100%; max-height: 60vh; background: #000; margin-top: .5rem; }
  #error { color: #b00020; white-space: pre-wrap; }
  table { width: 100%; border-collapse: collapse; font-size: 13px; margin-top: 1rem; }
  td { padding: .2rem .4rem; border-bottom: 1px solid #ddd; }
  tr:hover { background: #f3f3f3; cursor: pointer; }
</style>
</head>
<body>
<h1>wanfast</h1>
<form id="form">
  <textarea id="prompt" required placeholder="A cat surfing a wave at sunset"></textarea>
  <div class="row">
    <label>size <input id="size"></label>
    <label>frames <input id="frames" type="number" min="1"></label>
    <label>steps <input id="steps" type="number" min="1"></label>
    <label>seed <input id="seed" type="number" min="0" value="0"></label>
  </div>
  <button id="submit" type="submit">Generate</button>
  <button id="cancel" type="button" disabled>Cancel</button>
</form>
<p id="error"></p>
<section id="job" hidden>
  <p><b id="state"></b> <span id="detail"></span> <small id="job-id"></small></p>
  <progress id="bar" max="1" value="0"></progress>
</section>
<video id="video" controls loop muted playsinline hidden></video>
<table><tbody id="jobs"></tbody></table>
<script>
"use strict";
const DEFAULTS = __DEFAULTS__;
const $ = (id) => document.getElementById(id);
// absolute URLs on the origin: a page opened as http://user:key@host/ may not fetch relative ones
const api = (path) => location.origin + path;
const FINAL = ["succeeded", "failed", "cancelled"];
let source = null, current = null;
for (const k of ["size", "frames", "steps"]) $(k).placeholder = DEFAULTS[k];

function show(job) {
  if (job.id !== current) return;
  const p = job.progress;
  $("job").hidden = false;
  $("job-id").textContent = job.id;
  $("state").textContent = job.state;
  $("bar").value = job.state === "succeeded" ? 1 : p.fraction;
  let detail = "";
  if (job.state === "queued") detail = `position ${job.queue_position + 1} in the queue`;
  if (job.state === "running" && p.steps) {
    detail = `step ${p.step} of ${p.steps}`;
    if (p.stage === "decoding") detail += " · decoding the video";
    else if (p.stage === "writing") detail += " · writing the MP4";
    else if (p.eta_seconds !== null) detail += ` · ETA ${p.eta_seconds.toFixed(1)} s`;
  }
  if (job.timings) detail = `${job.timings.total.toFixed(2)} s`;
  $("detail").textContent = detail;
  $("error").textContent = job.error || "";
  $("cancel").disabled = FINAL.includes(job.state);
  if (job.state === "succeeded" && $("video").src !== api(job.content_url)) {
    $("video").hidden = false;
    $("video").src = api(job.content_url);
    $("video").play().catch(() => {});  // autoplay may be refused; the controls still work
  }
}

function watch(job) {
  if (source) source.close();
  current = job.id;
  $("video").hidden = true;
  $("video").removeAttribute("src");
  show(job);
  if (FINAL.includes(job.state)) return;
  source = new EventSource(api(`/v1/videos/${job.id}/events`));
  source.addEventListener("progress", (e) => show(JSON.parse(e.data)));
  source.addEventListener("done", (e) => { source.close(); show(JSON.parse(e.data)); refresh(); });
}

async function refresh() {
  const r = await fetch(api("/v1/videos?limit=10"));
  if (!r.ok) return;
  const rows = (await r.json()).data.map((job) => {
    const tr = document.createElement("tr");
    for (const text of [job.state, job.request.prompt, new Date(job.created_at * 1000).toLocaleTimeString()]) {
      const td = document.createElement("td");
      td.textContent = text;  // text, never HTML: prompts are user input
      tr.appendChild(td);
    }
    tr.onclick = () => watch(job);
    return tr;
  });
  $("jobs").replaceChildren(...rows);
}

$("form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const body = { prompt: $("prompt").value };
  if ($("size").value) body.size = $("size").value;
  for (const k of ["frames", "steps", "seed"]) if ($(k).value !== "") body[k] = Number($(k).value);
  const r = await fetch(api("/v1/videos"), {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const data = await r.json();
  if (!r.ok) { $("error").textContent = data.detail; return; }
  watch(data);
  refresh();
});

$("cancel").addEventListener("click", async () => {
  if (current) show(await (await fetch(api(`/v1/videos/${current}`), { method: "DELETE" })).json());
});

refresh();
</script>
</body>
</html>
"""


_DOCS_STYLE = """
  body { font: 14px system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  h2 { font-size: 16px; margin-top: 2rem; border-bottom: 1px solid #ccc; }
  code { background: #f3f3f3; padding: 0 .2rem; }
  table { border-collapse: collapse; margin: .3rem 0 1rem; }
  td, th { text-align: left; padding: .15rem .6rem .15rem 0; vertical-align: top; border-bottom: 1px solid #eee; }
  .m { font-weight: bold; }
"""


def _kind(schema: dict) -> str:
    """A short type of a JSON schema: ``integer``, ``string | null``, ``one of "unipc", ...``."""
    if "anyOf" in schema:
        return " | ".join(_kind(s) for s in schema["anyOf"])
    if "enum" in schema:
        return "one of " + ", ".join(json_text(v) for v in schema["enum"])
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    return schema.get("type", "any")


def json_text(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


def _limits(schema: dict) -> str:
    marks = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<",
             "minLength": "length >=", "maxLength": "length <=", "pattern": "matches"}  # fmt: skip
    found = [f"{mark} {schema[key]}" for key, mark in marks.items() if key in schema]
    for alt in schema.get("anyOf", []):
        found += [f"{mark} {alt[key]}" for key, mark in marks.items() if key in alt]
    return ", ".join(found)


def _rows(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    out = "<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"
    for row in rows:
        out += "<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>"
    return out + "</table>"


def docs_page(openapi: dict) -> str:
    """The API reference, rendered on the server from the OpenAPI schema (also at ``/openapi.json``)."""
    schemas = openapi.get("components", {}).get("schemas", {})
    info = openapi.get("info", {})
    parts = [f"<h1>{escape(info.get('title', ''))} {escape(info.get('version', ''))}</h1>",
             f"<p>{escape(info.get('description', ''))}</p>",
             '<p>The machine-readable schema: <a href="openapi.json"><code>/openapi.json</code></a>.</p>']  # fmt: skip
    for path, methods in openapi.get("paths", {}).items():
        for method, op in methods.items():
            parts.append(
                f'<h2><span class="m">{escape(method.upper())}</span> <code>{escape(path)}</code></h2>'
            )
            parts.append(f"<p>{escape(op.get('description') or op.get('summary', ''))}</p>")
            params = [(p["name"], p["in"], _kind(p.get("schema", {})), _limits(p.get("schema", {})),
                       "yes" if p.get("required") else "", p.get("description", ""))
                      for p in op.get("parameters", [])]  # fmt: skip
            if params:
                parts.append(_rows(("parameter", "in", "type", "limits", "required", ""), params))
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            model = schemas.get(body.get("$ref", "").rsplit("/", 1)[-1], {})
            if model:
                required = set(model.get("required", []))
                rows = [(name, _kind(f), _limits(f), json_text(f["default"]) if "default" in f else "",
                         "yes" if name in required else "", f.get("description", ""))
                        for name, f in model.get("properties", {}).items()]  # fmt: skip
                parts.append("<p>JSON body (<code>Content-Type: application/json</code>):</p>")
                parts.append(_rows(("field", "type", "limits", "default", "required", ""), rows))
            codes = [(code, r.get("description", "")) for code, r in op.get("responses", {}).items()]
            parts.append(_rows(("status", ""), codes))
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>wanfast API</title>'
        f"<style>{_DOCS_STYLE}</style></head><body>" + "\n".join(parts) + "</body></html>"
    )
