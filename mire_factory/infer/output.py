"""The predictions JSONL: an append-only log (append_log) of one row per record id, appended as answers come,
resumed by id (a later row of an id supersedes an earlier one: --retry_failed), put in dataset order when complete."""

from __future__ import annotations

import json

from ..append_log import AppendLog
from ..io import MireInputError, write_jsonl_atomic


class PredictionsLog(AppendLog[dict]):
    """Rows {"id", "prompt", "predict", "label", "task", "truncation"[, "error"]}, the id first."""

    line_start = b'{"id": '
    kind = "a predictions file of tools.vllm_infer"
    hint = "fix or remove it, or choose another --save_name"
    writer = "tools.vllm_infer"

    def parse(self, row: dict, lineno: int) -> dict:
        if not isinstance(row.get("id"), str):
            raise MireInputError(f"{self.path}: line {lineno}: field 'id': missing")
        return row

    def key(self, row: dict) -> str:
        return row["id"]

    def dump(self, row: dict) -> str:
        return json.dumps(row, ensure_ascii=False)

    def done(self) -> dict[str, dict]:
        """The latest row of each id written so far (a cut last line is removed from the file)."""
        return self.latest()

    def finalize(self, ordered_ids: list[str]) -> bool:
        """Rewrites the file in dataset order once every id is in it; False (file untouched) when some are missing."""
        done = self.done()
        if any(rid not in done for rid in ordered_ids):
            return False
        write_jsonl_atomic(self.path, [done[rid] for rid in ordered_ids])
        return True
