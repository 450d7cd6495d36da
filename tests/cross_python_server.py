"""A minimal NDIF worker for another Python version: load a model, run one request blob.

``python cross_python_server.py MODEL_DIR REQUEST_BLOB RESULT_BLOB`` (run by
``test_cross_python.py`` with the second interpreter). Needs torch, transformers, nnsight and
zstandard — and not ``atp_nnsight``, which NDIF does not have either. The model is loaded from
``MODEL_DIR`` (``save_pretrained`` output, fp32) and frozen; the request is deserialized,
executed as the outermost trace, and its saved values written with ``torch.save`` + zstd, as
the server does. Exits 0 on success; a failure prints its traceback and exits 1.
"""

from __future__ import annotations

import io
import sys

import torch
import transformers
import zstandard
from nnsight.modeling.transformers import TransformersModel
from nnsight.schema.request import RequestModel
from nnsight.tracing import tracer as _tracer


def main(model_dir: str, request_path: str, result_path: str) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    hf.requires_grad_(False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = TransformersModel(hf, tokenizer=tokenizer)
    with open(request_path, "rb") as f:
        blob = f.read()
    tracer = RequestModel.deserialize(blob, model._remoteable_persistent_objects(), True)
    _tracer.inc()
    try:
        tracer.execute(tracer.info.code)
        saves = _tracer._saves()
        result = {k: v for k, v in tracer.info.frame.f_locals.items() if id(v) in saves}
    finally:
        _tracer.dec()
    buffer = io.BytesIO()
    torch.save(result, buffer, pickle_protocol=4)
    with open(result_path, "wb") as f:
        f.write(zstandard.ZstdCompressor(level=6).compress(buffer.getvalue()))


if __name__ == "__main__":
    main(*sys.argv[1:4])
