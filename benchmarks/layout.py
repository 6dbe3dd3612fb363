"""What finding a shared batch's layout costs (which values hold rows: two fake forwards, kept per input shape).

Run `python benchmarks/layout.py [--smollm2]`. Printed, all measured in this run, on a tiny Llama, a tiny
GPT-2 and, with --smollm2, the embedded SmolLM2-135M (one torch thread): the merged forward of two jobs
(untrusted, as a server runs it; median of repeats, the layout already kept), the layout of a batch of a
new kind of forward (the two fake forwards, warm) and the lookup of a kept one (a batch of other sizes finds it), each with its ratio to the forward.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import interlace  # noqa: E402
from interlace.backends import layout  # noqa: E402
from interlace.backends.limits import Limits  # noqa: E402
from interlace.backends.serialize import deserialize_request, serialize_graph  # noqa: E402

SIZES = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=100, max_position_embeddings=64, n_layer=2, n_embd=32, n_head=4, n_positions=64)


def tiny(config_class) -> interlace.LanguageModel:
    torch.manual_seed(0)
    config = config_class(**{k: v for k, v in SIZES.items() if k in config_class().to_dict()}, pad_token_id=0)
    vocab = {f"w{i}": i for i in range(100)}
    import tokenizers

    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w1"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0", eos_token="w0")
    return interlace.LanguageModel(transformers.AutoModelForCausalLM.from_config(config).eval(), tokenizer=tokenizer)


def request(lm, prompt):
    with lm.trace(prompt) as tracer:  # (run here once too) its graph is the request a client would send
        lm.output.logits.save()
    return deserialize_request(serialize_graph(tracer.graph, tracer.invokes, options=tracer.spec(0).options))


def measure(name, lm, prompts, other_prompts, repeats=7):
    requests = [request(lm, prompt) for prompt in prompts]
    lm.run_many(requests, untrusted=True, limits=Limits())  # the layout of this kind of forward is kept from here on
    forward = []
    for _ in range(repeats):
        start = time.perf_counter()
        lm.run_many(requests, untrusted=True, limits=Limits())
        forward.append(time.perf_counter() - start)
    forward = statistics.median(forward)
    other, other_rows = lm._tokenize([((prompt,), {}) for prompt in other_prompts])  # other sizes, the same kind
    start = time.perf_counter()
    for _ in range(100):
        layout.layout_of(lm.module, ((), dict(other)), len(other_rows))
    kept = (time.perf_counter() - start) / 100
    start = time.perf_counter()
    layout.find_layout(lm.module, list(lm.module.named_modules()), ((), dict(other)), len(other_rows))
    new = time.perf_counter() - start
    print(f"{name}: merged forward of 2 jobs {forward * 1e3:.1f} ms; layout of a new kind {new * 1e3:.0f} ms "
          f"({new / forward:.1f}x); kept layout {kept * 1e6:.0f} us ({kept / forward:.4f}x)")


def main():
    torch.set_num_threads(1)
    measure("tiny llama", tiny(transformers.LlamaConfig), ["w5 w6 w7", "w8 w9 w10"], ["w5 w6 w7 w8"] * 3)
    measure("tiny gpt2", tiny(transformers.GPT2Config), ["w5 w6 w7", "w8 w9 w10"], ["w5 w6 w7 w8"] * 3)
    if "--smollm2" in sys.argv:
        measure("SmolLM2-135M", interlace.LanguageModel.default(dispatch=True),
                ["The capital of France is", "The capital of Spain is"], ["The capital of Italy is a city"] * 3)


if __name__ == "__main__":
    main()
