"""What a bug report needs: the versions of interlace and what it runs on, CUDA, and the embedded model.

`interlace --version` prints the versions (read from the installed packages' metadata: nothing heavy is
imported); `interlace doctor` adds whether CUDA is visible and whether the embedded SmolLM2 loads and
predicts.
"""

from __future__ import annotations

import platform
import time
from importlib.metadata import PackageNotFoundError, version

CORE = ("interlace", "torch", "transformers", "accelerate")
EXTRAS = ("pydantic", "safetensors", "gguf", "fastapi", "uvicorn", "httpx", "plotly", "pandas", "ray")


def installed(package: str) -> str:
    """The installed version of `package`, or 'not installed'."""
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    """Python, interlace, its core dependencies and the optional ones, in that order."""
    return {"python": f"{platform.python_version()} ({platform.system()} {platform.machine()})",
            **{package: installed(package) for package in CORE + EXTRAS}}


def cuda() -> str:
    """Whether torch sees a GPU, and which."""
    import torch

    if not torch.cuda.is_available():
        return f"not available (torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{len(names)} device(s): {', '.join(names)} (CUDA {torch.version.cuda})"


def embedded_model() -> str:
    """Load the embedded SmolLM2 and check its prediction for a known prompt; raises on failure."""
    from .models.language import LanguageModel

    start = time.perf_counter()
    model = LanguageModel.default(dispatch=True)
    with model.trace("The capital of France is"):
        logits = model.output.logits[0, -1].save()
    word = model.tokenizer.decode(logits.argmax())
    if word != " Paris":
        raise RuntimeError(f"it loads, but predicts {word!r} after 'The capital of France is' instead of ' Paris'")
    return f"loads and predicts ' Paris' ({time.perf_counter() - start:.1f} s)"


def report(*, model: bool = True) -> str:
    """The lines to paste into a bug report."""
    lines = [f"{name:<13} {value}" for name, value in versions().items()]
    lines.append(f"{'cuda':<13} {cuda()}")
    if model:
        try:
            status = embedded_model()
        except Exception as error:  # the report says what failed instead of failing itself
            status = f"FAILED: {type(error).__name__}: {error}"
        lines.append(f"{'smollm2':<13} {status}")
    return "\n".join(lines)
