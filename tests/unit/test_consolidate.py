"""Streamed consolidation (dpkit/consolidate.py) against transformers' own save_pretrained.

The reference is what `dpkit export` did before: the whole state dict in memory, cast with
model.to(dtype), written by save_pretrained. The streamed writer must produce the same files
(names, index, config.json), bitwise the same tensors (read back by the safetensors library),
a model from_pretrained loads — and hold one weight in memory at a time. The real ZeRO-3
checkpoint of a 2-rank run is compared in tests/distributed/test_checkpoint.py."""

from __future__ import annotations

import copy
import json
import weakref
from pathlib import Path

import pytest
import torch
from conftest import TOKENIZER
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GenerationConfig,
    LlamaConfig,
    MixtralConfig,
)

from dpkit import checkpoint as C
from dpkit.consolidate import save_model, write_safetensors
from dpkit.export import export
from dpkit.rundir import MARKER

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256)
CONFIGS = {"llama-tied": lambda: LlamaConfig(**SMALL, tie_word_embeddings=True),
           "llama": lambda: LlamaConfig(**SMALL, tie_word_embeddings=False),
           # transformers fuses Mixtral's experts in memory and splits them again on save
           "mixtral": lambda: MixtralConfig(**SMALL, num_local_experts=2),
           # a reward model's head (dpkit/heads.py: sequence_classification)
           "llama-reward": lambda: LlamaConfig(**SMALL, num_labels=1, pad_token_id=0)}


def auto_class(config):
    return (AutoModelForSequenceClassification if config.num_labels == 1 and
            getattr(config, "pad_token_id", None) == 0 else AutoModelForCausalLM)


def real_model(config):
    torch.manual_seed(0)
    return auto_class(config).from_config(config).eval()


def meta_model(config):
    with torch.device("meta"):
        model = auto_class(config).from_config(copy.deepcopy(config))
    model.generation_config = GenerationConfig.from_model_config(config)
    return model


def tensors(out: Path) -> dict[str, torch.Tensor]:
    found = {}
    for f in sorted(out.glob("*.safetensors")):
        found.update(load_file(f))
    return found


def assert_same_export(ours: Path, reference: Path):
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in ours.iterdir()) == names
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json"):
        if (reference / name).exists():
            assert json.loads((ours / name).read_text()) == json.loads((reference / name)
                                                                          .read_text()), name
    a, b = tensors(ours), tensors(reference)
    assert a.keys() == b.keys()
    for k in b:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_streamed_save_equals_save_pretrained(tmp_path, kind, dtype):
    config = CONFIGS[kind]()
    model = real_model(config)
    weights = model.state_dict()  # tied weights: two names, one tensor, as DeepSpeed gives them
    reference = tmp_path / "reference"
    copy.deepcopy(model).to(dtype).save_pretrained(reference, max_shard_size="40KB")
    ours = tmp_path / "ours"
    ours.mkdir()
    save_model(meta_model(config), weights, ours, dtype, "40KB")
    assert (ours / "model.safetensors.index.json").is_file()  # several shards
    assert_same_export(ours, reference)
    loaded, expected = (auto_class(config).from_pretrained(d, dtype=torch.float32).eval()
                        for d in (ours, reference))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected(ids).logits)


class Counted:
    """A lazy weight (DeepSpeed's GatheredTensor has the same face): counts how many gathered
    tensors are alive at once."""
    alive = 0
    peak = 0

    def __init__(self, tensor):
        self.tensor, self.shape, self.dtype = tensor, tensor.shape, tensor.dtype

    def contiguous(self):
        out = self.tensor.clone()
        Counted.alive += 1
        Counted.peak = max(Counted.peak, Counted.alive)
        weakref.finalize(out, Counted.release)
        return out

    @staticmethod
    def release():
        Counted.alive -= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_weight_in_memory_at_a_time(tmp_path, dtype):
    config = CONFIGS["llama"]()
    lazy = {k: Counted(v) for k, v in real_model(config).state_dict().items()}
    Counted.alive = Counted.peak = 0
    save_model(meta_model(config), lazy, tmp_path, dtype, "5GB")
    assert Counted.peak == 1 and Counted.alive == 0
    assert len(tensors(tmp_path)) == len(lazy)


class Recorded:
    """A lazy weight that records the order it is read in."""

    def __init__(self, tensor, reads: list, name: str):
        self.tensor, self.shape, self.dtype, self.reads, self.name = \
            tensor, tensor.shape, tensor.dtype, reads, name

    def contiguous(self):
        self.reads.append(self.name)
        return self.tensor.clone()


@pytest.mark.parametrize("kind", ["llama-tied", "mixtral"])
def test_ranks_that_do_not_write_read_the_writers_weights_in_its_order(tmp_path, kind):
    """The final save under ZeRO-3 gathers each weight collectively: the ranks that do not write
    (write=False) must read the same weights in the same order as the writer, or the gathers
    pair up different parameters (and hang or mix them). Several shards, tied weights; Mixtral's
    experts go through transformers' conversion (the whole state dict)."""
    config = CONFIGS[kind]()
    state = real_model(config).state_dict()
    orders = []
    for write in (True, False):
        reads: list[str] = []
        weights = {k: Recorded(v, reads, k) for k, v in state.items()}
        out = tmp_path / str(write)
        out.mkdir()
        save_model(meta_model(config), weights, out if write else None, None, "40KB",
                   write=write)
        orders.append(reads)
        assert any(out.iterdir()) == write
    assert orders[0] == orders[1] and len(orders[0]) == len(set(orders[0]))
    assert set(orders[0]) == set(state) - {"lm_head.weight"} if kind == "llama-tied" else \
        set(orders[0]) == set(state)  # every weight once; a tied one under its kept name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_model_from_pretrained_streams_and_shards_as_save_pretrained(tmp_path, dtype):
    """A run's live model was loaded with from_pretrained: transformers records the conversions
    it applied (none for Llama) and its revert hands the state dict back sorted by name, which
    is the order save_pretrained shards in. The same names and tensors: still written one at a
    time, and the shards follow that order; each tensor in the live model's dtype (no cast)."""
    config = CONFIGS["llama"]()
    real_model(config).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=dtype)
    reference = tmp_path / "reference"
    copy.deepcopy(model).save_pretrained(reference, max_shard_size="40KB")
    lazy = {k: Counted(v) for k, v in model.state_dict().items()}
    Counted.alive = Counted.peak = 0
    ours = tmp_path / "ours"
    ours.mkdir()
    save_model(model, lazy, ours, None, "40KB")
    assert Counted.peak == 1 and Counted.alive == 0
    assert_same_export(ours, reference)


def test_safetensors_writer_is_read_by_the_library(tmp_path):
    made = {"f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(),
            "i64": torch.arange(3), "flag": torch.tensor([True, False, True]),
            "empty": torch.zeros(0, 4), "f16": torch.randn(2, 2).half()}
    layout = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in made.items()}
    path = tmp_path / "x.safetensors"
    write_safetensors(path, layout, {k: (lambda k=k: made[k]) for k in made}, {"format": "pt"})
    back = load_file(path)
    assert back.keys() == made.keys()
    assert all(back[k].dtype == made[k].dtype and torch.equal(back[k], made[k]) for k in made)
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert header % 8 == 0  # data starts aligned
    with pytest.raises(RuntimeError, match="the header says"):
        write_safetensors(tmp_path / "y.safetensors", layout,
                          {**{k: (lambda k=k: made[k]) for k in made},
                           "f32": lambda: torch.zeros(5, 3)}, {})


def test_export_of_a_zero0_checkpoint_equals_save_pretrained(tmp_path):
    """The whole `export` on a ZeRO-0 checkpoint (one file of the whole module, DeepSpeed's
    layout), read memory-mapped and written weight by weight, tied embeddings included."""
    from transformers import AutoTokenizer

    config = CONFIGS["llama-tied"]()
    model = real_model(config)
    ckpt = C.checkpoints_dir(tmp_path / "run") / C.step_name(2)
    (ckpt / "ds").mkdir(parents=True)
    torch.save({"module": model.state_dict(), "buffer_names": []},
               ckpt / "ds" / "mp_rank_00_model_states.pt")
    (ckpt / "dpkit.json").write_text(json.dumps(C.TrainState(
        step=2, tokens_seen=1, world_size=1, zero_stage=0, seed=0, steps_per_epoch=4).__dict__))
    config.save_pretrained(ckpt / "hf")
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(ckpt / "hf")
    (ckpt / C.MARKER).write_text("2\n")
    out = export(tmp_path / "run", tmp_path / "export", dtype="bf16", max_shard_size="40KB")
    reference = tmp_path / "reference"
    ref_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt / "hf"))
    ref_model.load_state_dict(model.state_dict())
    ref_model.generation_config = GenerationConfig.from_model_config(ref_model.config)
    ref_model.to(torch.bfloat16).save_pretrained(reference, max_shard_size="40KB")
    AutoTokenizer.from_pretrained(ckpt / "hf").save_pretrained(reference)
    (reference / MARKER).touch()  # the export's own marker (dpkit/rundir.py)
    assert_same_export(out, reference)
