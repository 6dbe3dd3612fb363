"""Small models and checks shared by the tests."""

import inspect
import math

import torch
import transformers

from interlace.source import rewritten_forward

class Block(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.linear = torch.nn.Linear(width, width)
        self.act = torch.nn.GELU()

    def forward(self, x):
        return x + self.act(self.linear(x))


class MLP(torch.nn.Module):
    """embed -> layers[0..n) -> head, each layer a residual Block."""

    def __init__(self, width=8, depth=4, out=5):
        super().__init__()
        self.embed = torch.nn.Linear(3, width)
        self.layers = torch.nn.ModuleList([Block(width) for _ in range(depth)])
        self.head = torch.nn.Linear(width, out)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


class Table(torch.nn.Module):
    """Returns a view of its own weight (as a learned position table sliced to the input does)."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.arange(12.0).reshape(4, 3))

    def forward(self, x):
        return self.table[: x.shape[0]]


def assert_clean(module: torch.nn.Module):
    """No hooks and no patched forward (but a `.source` rewrite) left anywhere in the module tree."""
    for name, sub in module.named_modules():
        assert not sub._forward_hooks, name
        assert not sub._forward_pre_hooks, name
        assert not sub._backward_hooks, name
        assert sub.__dict__.get("forward") is rewritten_forward(sub), name  # a `.source` rewrite stays


FAMILIES = {
    "gpt2": lambda: transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64),
    "llama": lambda: transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
    ),
    "mistral": lambda: transformers.MistralConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
    ),
    "gemma2": lambda: transformers.Gemma2Config(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=100, max_position_embeddings=64,
    ),
}


def tiny(family: str, positions: int | None = None):
    """A random model of `family` (seed 0); `positions`: its longest sequence, for long generations."""
    torch.manual_seed(0)
    config = FAMILIES[family]()
    if positions is not None:
        config.max_position_embeddings = positions
    config.pad_token_id = config.bos_token_id = 0
    config.eos_token_id = None  # random models must not end generation early
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def tiny_tokenizer(vocab_size: int = 100):
    """A word-level tokenizer built offline: words 'w0' ... 'w{n-1}' are token ids 0 ... n-1."""
    import tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w1"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    # whole-word special tokens: plain ones would also match inside "w14" and split it
    special = {name: tokenizers.AddedToken(word, single_word=True) for name, word in
               (("pad_token", "w0"), ("eos_token", "w0"), ("unk_token", "w1"))}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def assert_close_in_batch(got: torch.Tensor, want: torch.Tensor, message: str = "") -> None:
    """Equal up to float rounding in a different batch: within 1e-5 relative to the tensor's scale."""
    scale = want.abs().max().item() if want.numel() and want.is_floating_point() else 0.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale + 1e-7, msg=lambda m: f"{message} {m}")


# tiny sizes, given to each config class that accepts them (the names differ between families)
FAMILY_SIZES = dict(
    num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=100, max_position_embeddings=64, head_dim=8, num_experts=4, num_local_experts=4,
    num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
)
FAMILY_OVERRIDES = {
    "codegen": {"rotary_dim": 4},
    "gptj": {"rotary_dim": 4},
    "falcon": {"head_dim": None},  # computed by FalconConfig
    "gpt_neo": {"head_dim": None, "attention_types": [[["global", "local"], 1]]},
}
def tiny_family(model_type: str) -> torch.nn.Module:
    config_class = transformers.CONFIG_MAPPING[model_type]
    default = config_class()
    accepted = {k for k in FAMILY_SIZES.keys() | FAMILY_OVERRIDES.get(model_type, {}).keys()
                if k in inspect.signature(config_class.__init__).parameters or hasattr(default, k)}
    sizes = {**FAMILY_SIZES, **FAMILY_OVERRIDES.get(model_type, {})}
    config = config_class(
        **{k: v for k, v in sizes.items() if v is not None and k in accepted},
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def check_without_refusing(self, tensor, argument, func):
    """`WriteCheck._check` as if no operator's schema declared its writes: the first line refuses nothing,
    and the version counters (the second line) still compare the weights a call saw."""
    pointer = tensor.untyped_storage().data_ptr()
    if pointer in self.weights:
        self.touched.add(pointer)


def same(a, b) -> bool:
    """Equal in type and value; tensors bit for bit (dtype, shape and bytes, nan included)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return (a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)))
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, slice):
        return same((a.start, a.stop, a.step), (b.start, b.stop, b.step))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return a == b
