#!/usr/bin/env python3
"""What a first GPU session must check of the device path before it trusts a figure from it:

  1. vectors: the feed at fp16 (tokenizer processes, token-budget batches, pinned copies on a
     copy stream, several windows) against fp32 `encode()` of the same model, for a BERT-shaped
     and a static (StaticEmbedding + Normalize) model: every vector finite, cosine >= 0.999;
  2. no hidden synchronisation: `torch.cuda.set_sync_debug_mode("warn")` over the device stage
     (the warnings it raises are counted and the first few shown);
  3. out of memory recovered: the same feed under `set_per_process_memory_fraction`, which forces
     the budget down, gives the same vectors;
  4. one CUDA context only: no tokenizer process opens one (nvidia-smi's compute processes).

    python3 scripts/gpu_check.py --device cuda --skeleton .gpu-bench/skeleton [--out FILE]

On a CPU (`--device cpu`) it runs 1's vector comparison (fp32 against fp32) as a smoke test of
the script itself; 2, 3 and 4 need CUDA and say so. Exit 0 when every check holds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _texts(n: int) -> list[str]:
    rng = np.random.default_rng(7)
    words = "database index vector search model embedding query table row column cosine graph kernel".split()
    return ["", " "] + [" ".join(rng.choice(words, size=int(k))) for k in rng.integers(3, 220, size=n - 2)]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    return np.where(both_zero, 1.0, (a * b).sum(1) / np.maximum(na * nb, 1e-12))


def _through_feed(emb: Any, texts: list[str], seen: dict[str, Any] | None = None,
                  **feed_options: Any) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The texts through the run's feed, window by window; `seen` gets the CUDA contexts open
    while the tokenizer processes are alive (after the first window)."""
    import structlog

    from reembed.signals import StopSignal

    feed = emb.feed(**feed_options)
    try:
        with structlog.testing.capture_logs() as logs:
            parts = []
            for start in range(0, len(texts), 1024):  # several windows, as a run sends them
                window = texts[start:start + 1024]
                out = feed.encode([feed.submit(window[i:i + 256]) for i in range(0, len(window), 256)], StopSignal())
                assert out is not None
                parts.extend(out)
                if seen is not None and "contexts" not in seen:
                    seen["contexts"] = cuda_contexts()
    finally:
        feed.close()
    return np.concatenate(parts), logs


def check(model_dir: Path, name: str, device: str, texts: list[str]) -> dict[str, Any]:
    import torch
    from sentence_transformers import SentenceTransformer

    from reembed.embedder import SentenceTransformerEmbedder
    from reembed.settings import ModelSpec

    cuda = device.startswith("cuda")
    want = SentenceTransformer(str(model_dir), device=device).encode(texts, convert_to_numpy=True, batch_size=64)
    emb = SentenceTransformerEmbedder(ModelSpec(model=str(model_dir), device=device,
                                                precision="fp16" if cuda else "fp32"))
    result: dict[str, Any] = {"model": name, "rows": len(texts), "precision": emb.precision}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            seen: dict[str, Any] = {}
            got, _ = _through_feed(emb, texts, seen if cuda else None, workers=2)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    cos = _cosines(got, want)
    result.update(finite=bool(np.isfinite(got).all()), min_cosine=round(float(cos.min()), 6),
                  vectors_ok=bool(np.isfinite(got).all() and cos.min() >= 0.999))
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
    result["sync_warnings"] = len(syncs) if cuda else "needs CUDA"
    result["sync_warning_examples"] = syncs[:3]
    if cuda:  # nvidia-smi's compute processes while the tokenizer processes ran: this one alone
        contexts = seen.get("contexts")
        result["cuda_contexts"] = contexts
        result["one_cuda_context"] = isinstance(contexts, list) and len(contexts) == 1
    if cuda:  # a memory cap that the default budget cannot fit: halved until it does, same vectors
        _, total = torch.cuda.mem_get_info(torch.device(device))
        used = torch.cuda.memory_allocated(torch.device(device))
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, (used + 96 * 2**20) / total), torch.device(device))
        try:
            capped, logs = _through_feed(emb, texts, workers=2, max_batch_tokens=1 << 20)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, torch.device(device))
        halvings = [e["max_batch_tokens"] for e in logs if e["event"] == "token_budget_halved"]
        ccos = _cosines(capped, want)
        result.update(oom_halvings=halvings, oom_min_cosine=round(float(ccos.min()), 6),
                      oom_ok=bool(halvings and np.isfinite(capped).all() and ccos.min() >= 0.999))
    else:
        result["oom_ok"] = "needs CUDA"
    return result


def cuda_contexts() -> Any:
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi: {exc}"
    return sorted({int(p) for p in out.split() if p.strip().isdigit()})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--skeleton", type=Path, required=True, help="model config + tokenizer dir (no weights)")
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    import fastmodel

    texts = _texts(args.rows)
    results: dict[str, Any] = {"device": args.device, "checks": []}
    with tempfile.TemporaryDirectory() as tmp:
        models = {
            "bert-minilm-shape": fastmodel.save_random_bert(Path(tmp) / "bert", skeleton=args.skeleton, hidden=384,
                                                            layers=6, heads=12, intermediate=1536),
            "static-normalized": fastmodel.save_static_model(Path(tmp) / "static", tokenizer_dir=args.skeleton,
                                                             dim=384, normalize=True),
        }
        for name, path in models.items():
            results["checks"].append(check(path, name, args.device, texts))
            print(json.dumps(results["checks"][-1]), flush=True)
    results["ok"] = all(c["vectors_ok"] and c["oom_ok"] in (True, "needs CUDA")
                        and c.get("one_cuda_context", True) is True for c in results["checks"])
    print(json.dumps({k: v for k, v in results.items() if k != "checks"}), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
