"""A small OpenAI-compatible chat server on loopback that injects faults, for tests and benchmarks.

python tests/fault_server.py [--port 0] [--latency 0.2] [--fault_rate 0.3] [--faults 429,500,timeout,reset,malformed]
    [--script 429,500,...] [--permanent] [--seed 0]

Prints `listening http://127.0.0.1:PORT/v1` once ready. Plain asyncio (HTTP/1.1 with keep-alive), so a reset is a
real TCP reset and a malformed body is exactly the bytes we choose.

- Transient faults: each request, with probability --fault_rate, gets one of --faults (429 with Retry-After, 500,
  a hang longer than the client's timeout, a connection reset, a 200 whose JSON body is cut off). --script lists
  faults served first, in order, to the first requests.
- Answers are a deterministic function of the prompt, so a rerun gets the same answer for the same record. The
  information-extraction prompt (it names 可见文字) gets that JSON, with lines that depend on the image. Modes 2/3
  answer with the gold label from the prompt (1 in 10 with another one); mode 1 picks a label from the instruction.
  Answers come in several wrappings (clean JSON, code fence, trailing text, single quotes).
- --permanent: 1 in 25 prompts each always get a content_filter finish, a refusal sentence, the refusal field,
  an unparseable reply, or HTTP 400 (not retryable), so runs end with every status.
- Odd shapes (--faults odd_choices,odd_content,odd_usage,odd_refusal,odd_body): a 200 with valid JSON of the
  wrong shape. odd_usage and odd_refusal still carry an answer or a refusal; the others carry nothing usable.
- --echo_key: every answer repeats the request's Authorization value inside 理由, and half of them answer it as the label,
  as a leaky proxy would; tools must never write it.
- POST /queue with a JSON list of strings: each string is sent verbatim as the 200 body of one later chat request,
  in order (for fuzzing the client with arbitrary replies); faults and answers resume once the queue is empty.
- GET /stats: counters of requests and faults served. If FAULT_SERVER_API_KEY is set, other keys get HTTP 401.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

FAULTS = ("429", "500", "timeout", "reset", "malformed")
# Valid JSON of the wrong shape, as broken proxies and servers send: choices ["x"], content a number, usage a
# string, `refusal: true` without words, a JSON list for a body.
ODD_FAULTS = ("odd_choices", "odd_content", "odd_usage", "odd_refusal", "odd_body")
_GOLD = re.compile(r"正确分类标签是「(.+?)」")
_LABEL_LIST = re.compile(r"\[(\"[^\]]*\")\]")
REFUSAL_TEXT = "抱歉，我无法协助处理这个请求。"


_LABEL_VALUE = re.compile(r"(所属类别[\"']?\s*[:：]\s*[\"'])([^\"']+)")  # the label in one of answer_for's replies


def _reason_text(digest: int, label: str, mode: int) -> str:
    base = f"界面与{label}的定义相符，编号{digest % 9973}。"
    return base if mode == 3 else base + "用户的诉求和页面内容都指向这一类别，其他标签的定义与之不符。"


def answer_for(prompt: str, images: list[str]) -> tuple[str, dict, int]:
    """("ok", message, digest) for a prompt; the digest also picks the permanent behaviour (--permanent)."""
    digest = int(hashlib.sha1("|".join([prompt, *images]).encode()).hexdigest()[:12], 16)
    if "可见文字" in prompt:  # tools.extract_info's information-extraction prompt
        info = {"页面类型": "界面与订单详情页一致", "类型线索": ["订单编号", "实付款"],
                "可见文字": [f"订单编号{digest % 99991}", f"实付款￥{digest % 997}.00", "申请售后"]}
        return "ok", {"role": "assistant", "content": json.dumps(info, ensure_ascii=False)}, digest
    gold = _GOLD.search(prompt)
    labels_match = _LABEL_LIST.search(prompt)
    labels = json.loads("[" + labels_match.group(1) + "]") if labels_match else ["其他类别图片"]
    mode = 3 if "不超过" in prompt else 2 if gold else 1
    if gold and digest % 10 != 9:
        label = gold.group(1)
    else:
        label = labels[digest % len(labels)]
    reason = _reason_text(digest, label, mode)
    style = (digest >> 8) % 5
    if style == 0:
        text = json.dumps({"理由": reason, "所属类别": label}, ensure_ascii=False)
    elif style == 1:
        text = "```json\n" + json.dumps({"理由": reason, "所属类别": label}, ensure_ascii=False, indent=2) + "\n```"
    elif style == 2:
        text = json.dumps({"理由": reason, "所属类别": label}, ensure_ascii=False) + "\n以上是我的判断。"
    elif style == 3:
        text = "{'理由': '" + reason + "', '所属类别': '" + label + "'}"
    else:
        text = "分析如下：\n{\"理由\": \"" + reason + "\", \"所属类别\": \"" + label + "\"}"
    return "ok", {"role": "assistant", "content": text}, digest


class FaultServer:
    def __init__(self, latency: float, fault_rate: float, faults: list[str], script: list[str], permanent: bool,
                 seed: int, hang: float, retry_after: float, echo_key: bool = False):
        self.echo_key = echo_key
        self.latency, self.fault_rate, self.faults = latency, fault_rate, faults
        self.script = list(script)
        self.permanent, self.hang, self.retry_after = permanent, hang, retry_after
        self.rng = random.Random(seed)
        self.stats: Counter = Counter()
        self.api_key = os.environ.get("FAULT_SERVER_API_KEY")
        self.queue: list[str] = []

    def _pick_fault(self) -> str | None:
        if self.script:
            fault = self.script.pop(0)
            return None if fault == "ok" else fault
        if self.fault_rate > 0 and self.rng.random() < self.fault_rate:
            return self.rng.choice(self.faults)
        return None

    async def respond(self, method: str, path: str, headers: dict, body: bytes) -> tuple[int, dict, bytes, str]:
        """(status, headers, body, action); action is "" or "reset"."""
        self.stats["requests"] += 1
        if method == "GET" and path.rstrip("/").endswith("/stats"):
            return 200, {}, json.dumps(self.stats).encode(), ""
        if method == "GET" and path.rstrip("/").endswith("/models"):
            return 200, {}, json.dumps({"object": "list", "data": [{"id": "fault-teacher", "object": "model"}]}).encode(), ""
        if method == "POST" and path.rstrip("/").endswith("/queue"):
            self.queue = list(json.loads(body))  # replaces what an earlier caller left
            return 200, {}, json.dumps({"queued": len(self.queue)}).encode(), ""
        if not path.rstrip("/").endswith("/chat/completions"):
            return 404, {}, _error("not found"), ""
        if self.api_key and headers.get("authorization") != f"Bearer {self.api_key}":
            self.stats["unauthorized"] += 1
            return 401, {}, _error("invalid api key", "invalid_api_key"), ""
        if self.queue:
            self.stats["queued_replies"] += 1
            return 200, {}, self.queue.pop(0).encode("utf-8", "surrogateescape"), ""
        fault = self._pick_fault()
        if fault:
            self.stats[f"fault_{fault}"] += 1
        if fault == "reset":
            return 0, {}, b"", "reset"
        if fault == "timeout":
            await asyncio.sleep(self.hang)
        elif self.latency:
            await asyncio.sleep(self.latency)
        if fault == "429":
            return 429, {"Retry-After": f"{self.retry_after:g}"}, _error("rate limited", "rate_limit_exceeded"), ""
        if fault == "500":
            return 500, {}, _error("internal error", "server_error"), ""
        request = json.loads(body)
        content = request["messages"][-1]["content"]
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        prompt = "".join(p.get("text", "") for p in parts if p.get("type") == "text")
        images = [p["image_url"]["url"] for p in parts if p.get("type") == "image_url"]
        n_images = len(images)
        kind, message, digest = answer_for(prompt, images)
        if self.echo_key:
            token = headers.get("authorization", "").removeprefix("Bearer ")
            text = message["content"]
            text = text.replace("界面与", f"界面与{token}", 1)
            if digest % 2:  # the label becomes the token itself (a padded label would be cut back to the label)
                text = _LABEL_VALUE.sub(lambda m: m.group(1) + token, text, count=1)
            message = {**message, "content": text}
        finish = "stop"
        if self.permanent:
            special = digest % 25
            if special == 0:
                kind, message, finish = "content_filter", {"role": "assistant", "content": ""}, "content_filter"
            elif special == 1:
                kind, message = "refusal_text", {"role": "assistant", "content": REFUSAL_TEXT}
            elif special == 2:
                kind, message = "refusal_field", {"role": "assistant", "content": None, "refusal": "policy"}
            elif special == 3:
                kind, message = "unparseable", {"role": "assistant", "content": "这张图片看起来很清楚。"}
            elif special == 4:
                self.stats["bad_request"] += 1
                return 400, {}, _error("this prompt is too long for the context window", "context_length"), ""
        self.stats[f"answer_{kind}"] += 1
        text = message.get("content") or ""
        reply = {
            "id": f"chatcmpl-{digest:x}", "object": "chat.completion", "created": 0, "model": request.get("model"),
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": len(prompt) + 100 * n_images, "completion_tokens": len(text),
                      "total_tokens": len(prompt) + 100 * n_images + len(text)},
        }
        if fault == "odd_choices":
            reply["choices"] = ["x"]
        elif fault == "odd_content":
            reply["choices"][0]["message"]["content"] = [1, 2] if digest % 2 else 5
        elif fault == "odd_usage":
            reply["usage"] = "abc"
        elif fault == "odd_refusal":
            reply["choices"][0]["message"] = {"role": "assistant", "content": None, "refusal": True}
        elif fault == "odd_body":
            reply = [reply]
        data = json.dumps(reply, ensure_ascii=False).encode()
        if fault == "malformed":
            data = data[: len(data) // 2]
        return 200, {}, data, ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                headers = {}
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    key, _, value = h.decode("latin-1").partition(":")
                    headers[key.strip().lower()] = value.strip()
                length = int(headers.get("content-length") or 0)
                body = await reader.readexactly(length) if length else b""
                method, path, _ = line.decode("latin-1").split(" ", 2)
                status, extra, payload, action = await self.respond(method, path, headers, body)
                if action == "reset":
                    sock = writer.get_extra_info("socket")
                    if sock is not None:  # linger 0: close() sends a TCP RST
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}", "Content-Type: application/json",
                        f"Content-Length: {len(payload)}"] + [f"{k}: {v}" for k, v in extra.items()]
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests",
            500: "Internal Server Error"}


def _error(message: str, code: str = "error") -> bytes:
    return json.dumps({"error": {"message": message, "type": code, "code": code}}).encode()


async def serve(args: argparse.Namespace) -> None:
    server = FaultServer(args.latency, args.fault_rate, [f for f in args.faults.split(",") if f],
                         [f for f in args.script.split(",") if f], args.permanent, args.seed, args.hang,
                         args.retry_after, args.echo_key)
    srv = await asyncio.start_server(server.handle, "127.0.0.1", args.port, backlog=1024)
    port = srv.sockets[0].getsockname()[1]
    print(f"listening http://127.0.0.1:{port}/v1", flush=True)
    async with srv:
        await srv.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--fault_rate", type=float, default=0.0)
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--script", default="", help="faults for the first requests, in order (ok = no fault)")
    parser.add_argument("--permanent", action="store_true", help="refusals, unparseable replies and 400s by prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hang", type=float, default=5.0, help="seconds a timeout fault waits before answering")
    parser.add_argument("--retry_after", type=float, default=0.05, help="Retry-After of a 429, seconds")
    parser.add_argument("--echo_key", action="store_true", help="answers repeat the Authorization value")
    args = parser.parse_args(argv)
    bad = [f for f in (args.faults + "," + args.script).split(",") if f and f not in (*FAULTS, *ODD_FAULTS, "ok")]
    if bad:
        parser.error(f"unknown faults {bad}; known: {FAULTS + ODD_FAULTS}")
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass


class RunningServer:
    """Starts the server as a subprocess (its own CPU time and GIL); `url` once it listens; stops it on exit."""

    def __init__(self, *args: str, env: dict | None = None):
        self.args, self.env = [str(a) for a in args], env
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> RunningServer:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *self.args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(self.env or {})})
        line = self.proc.stdout.readline()
        if not line.startswith("listening "):
            self.proc.kill()
            raise RuntimeError(f"fault server did not start: {line}{self.proc.stderr.read()}")
        self.url = line.split()[1]
        return self

    def stats(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(self.url + "/stats", timeout=10) as resp:
            return json.loads(resp.read())

    def queue(self, bodies: list[str]) -> None:
        """The next len(bodies) chat replies are these bodies, verbatim."""
        import urllib.request

        request = urllib.request.Request(self.url + "/queue", data=json.dumps(bodies).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=10) as resp:
            resp.read()

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


if __name__ == "__main__":
    main()
