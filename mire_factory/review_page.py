"""A self-contained HTML page to review suspected label errors: per suspect its thumbnails, dialogue, gold label and
the evidence (teacher label and reason per mode, or out-of-fold predictions); the reviewer accepts (with the new
label and an optional fixed reason) or rejects each, and saves the corrections file (corrections.py) from the
browser. One file, no network: images are small JPEG data URIs, the data a JSON block, the script inline."""

from __future__ import annotations

import base64
import html
import io
import json
import os

from .corrections import STATUSES, Correction
from .records import IMAGE_ERRORS, MireRecord, resolve_image
from .taxonomy import DIALOGUE_END, DIALOGUE_START, LABELS

THUMBNAIL_SIDE = 240
THUMBNAIL_QUALITY = 70
SAVE_NAME = "corrections.jsonl"


def thumbnail_data_uri(path: str | os.PathLike, side: int = THUMBNAIL_SIDE) -> str | None:
    """A JPEG data URI of the image shrunk to `side` pixels on its longest side; None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.thumbnail((side, side))
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="JPEG", quality=THUMBNAIL_QUALITY)
    except IMAGE_ERRORS:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def dialogue_text(record: MireRecord) -> str:
    text = record.instruction
    if DIALOGUE_START in text:
        text = text.split(DIALOGUE_START, 1)[1].split(DIALOGUE_END, 1)[0]
    return text.strip()


def page_items(corrections: list[Correction], records: dict[str, MireRecord],
               image_dir: str | os.PathLike | None) -> list[dict]:
    items = []
    for c in corrections:
        record = records[c.id]
        images = []
        for name in record.images:
            path = resolve_image(image_dir, name) if image_dir is not None else None
            images.append({"name": name, "src": thumbnail_data_uri(path) if path is not None else None})
        items.append({"correction": c.to_dict(), "task": record.task,
                      "dialogue": dialogue_text(record) if record.task == "dialogue" else "", "images": images})
    return items


def review_html(corrections: list[Correction], records: dict[str, MireRecord],
                image_dir: str | os.PathLike | None, title: str = "Suspected label errors") -> str:
    data = {"items": page_items(corrections, records, image_dir), "labels": {t: list(v) for t, v in LABELS.items()},
            "statuses": list(STATUSES), "save_name": SAVE_NAME, "images_given": image_dir is not None}
    # "</" inside the JSON would end the script element early
    blob = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    return PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", blob)


PAGE = """<!DOCTYPE html>
<html lang="zh">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>
body { font-family: "Noto Sans CJK SC", "Microsoft YaHei", sans-serif; margin: 1em; background: #fafafa; }
header { position: sticky; top: 0; background: #fff; padding: .5em; border-bottom: 1px solid #ccc; z-index: 1; }
section.suspect { background: #fff; border: 1px solid #ccc; border-left: 6px solid #bbb; margin: .8em 0;
  padding: .6em; }
section.suspect[data-status=accepted] { border-left-color: #2a2; }
section.suspect[data-status=rejected] { border-left-color: #c33; }
.thumbs img { max-height: 240px; margin-right: .4em; border: 1px solid #ddd; }
.dialogue { white-space: pre-wrap; background: #f3f3f3; padding: .4em; max-height: 16em; overflow: auto; }
table.evidence { border-collapse: collapse; margin: .4em 0; }
table.evidence td, table.evidence th { border: 1px solid #ddd; padding: .2em .4em; text-align: left; }
.gold { color: #a00; font-weight: bold; } .status { font-weight: bold; }
textarea.reason { width: 60%; height: 3em; } input.why { width: 40%; }
</style>
</head>
<body>
<header>
  <h1>__TITLE__</h1>
  reviewer <input id="reviewer" placeholder="your name">
  task <select id="filter-task"><option value="">all</option></select>
  gold class <select id="filter-class"><option value="">all</option></select>
  status <select id="filter-status"><option value="">all</option></select>
  <button id="save">save corrections file</button>
  <span id="counts"></span>
</header>
<main id="list"></main>
<script type="application/json" id="mire-data">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("mire-data").textContent);
const rows = DATA.items.map(item => Object.assign({}, item.correction));
const el = (tag, attrs, text) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
};
function fillOptions(select, values) {
  for (const v of values) select.appendChild(el("option", {value: v}, v));
}
fillOptions(document.getElementById("filter-task"), [...new Set(DATA.items.map(i => i.task))]);
fillOptions(document.getElementById("filter-class"), [...new Set(rows.map(r => r.gold))].sort());
fillOptions(document.getElementById("filter-status"), DATA.statuses);

function setStatus(k, status) {
  const card = document.querySelector(`section.suspect[data-index="${k}"]`);
  const row = rows[k];
  row.status = status;
  row.label = card.querySelector("select.label").value;
  const reason = card.querySelector("textarea.reason").value.trim();
  row.reason = reason ? reason : null;
  row.why = card.querySelector("input.why").value.trim();
  row.by = status === "suspected" ? DATA.items[k].correction.by
                                  : (document.getElementById("reviewer").value.trim() || "reviewer");
  card.dataset.status = status;
  card.querySelector(".status").textContent = status;
  update();
}

function render() {
  const list = document.getElementById("list");
  DATA.items.forEach((item, k) => {
    const c = rows[k];
    const card = el("section", {"class": "suspect", "data-index": k, "data-id": c.id, "data-task": item.task,
                                "data-gold": c.gold, "data-status": c.status});
    const head = el("h3", {}, c.id + "  ");
    head.appendChild(el("span", {"class": "status"}, c.status));
    card.appendChild(head);
    const gold = el("p", {}, `${item.task} task. gold: `);
    gold.appendChild(el("span", {"class": "gold"}, c.gold));
    gold.appendChild(document.createTextNode(`  proposed: ${c.label}  (${c.source}${c.why ? ": " + c.why : ""})`));
    card.appendChild(gold);
    const thumbs = el("div", {"class": "thumbs"});
    for (const image of item.images) {
      if (image.src) thumbs.appendChild(el("img", {src: image.src, alt: image.name, title: image.name}));
      else thumbs.appendChild(el("span", {}, `[${image.name}: ${DATA.images_given ? "unreadable" : "no --image_dir"}] `));
    }
    card.appendChild(thumbs);
    if (item.dialogue) card.appendChild(el("div", {"class": "dialogue"}, item.dialogue));
    if (c.evidence.length) {
      const table = el("table", {"class": "evidence"});
      const keys = [...new Set(c.evidence.flatMap(e => Object.keys(e)))];
      const header = el("tr");
      for (const key of keys) header.appendChild(el("th", {}, key));
      table.appendChild(header);
      for (const e of c.evidence) {
        const tr = el("tr");
        for (const key of keys) tr.appendChild(el("td", {}, e[key] === undefined || e[key] === null ? "" : String(e[key])));
        table.appendChild(tr);
      }
      card.appendChild(table);
    }
    const controls = el("div", {"class": "controls"});
    controls.appendChild(document.createTextNode("new label "));
    const select = el("select", {"class": "label"});
    fillOptions(select, DATA.labels[item.task]);
    select.value = c.label;
    controls.appendChild(select);
    controls.appendChild(document.createTextNode(" why "));
    controls.appendChild(el("input", {"class": "why", value: c.status === "suspected" ? "" : c.why}));
    for (const [cls, status] of [["accept", "accepted"], ["reject", "rejected"], ["undo", "suspected"]]) {
      const button = el("button", {"class": cls}, cls);
      button.addEventListener("click", () => setStatus(k, status));
      controls.appendChild(button);
    }
    controls.appendChild(el("br"));
    controls.appendChild(document.createTextNode("fixed reason (optional) "));
    const reason = el("textarea", {"class": "reason"});
    reason.value = c.reason || "";
    controls.appendChild(reason);
    card.appendChild(controls);
    list.appendChild(card);
  });
}

function update() {
  const task = document.getElementById("filter-task").value;
  const gold = document.getElementById("filter-class").value;
  const status = document.getElementById("filter-status").value;
  let shown = 0;
  document.querySelectorAll("section.suspect").forEach(card => {
    const visible = (!task || card.dataset.task === task) && (!gold || card.dataset.gold === gold) &&
                    (!status || card.dataset.status === status);
    card.style.display = visible ? "" : "none";
    shown += visible;
  });
  const counts = DATA.statuses.map(s => `${s} ${rows.filter(r => r.status === s).length}`).join(", ");
  document.getElementById("counts").textContent = `${shown} of ${rows.length} shown; ${counts}`;
}

function corrections() {
  const keys = ["id", "status", "gold", "label", "reason", "by", "why", "source", "evidence"];
  return rows.map(r => JSON.stringify(Object.fromEntries(keys.map(k => [k, r[k]])))).join("\\n") + "\\n";
}

document.getElementById("save").addEventListener("click", () => {
  const blob = new Blob([corrections()], {type: "application/x-ndjson"});
  const a = el("a", {href: URL.createObjectURL(blob), download: DATA.save_name});
  document.body.appendChild(a);
  a.click();
  a.remove();
});
for (const id of ["filter-task", "filter-class", "filter-status"]) {
  document.getElementById(id).addEventListener("change", update);
}
render();
update();
</script>
</body>
</html>
"""
