"""The recipe library (recipes/<model>/*.yaml) is valid, planned and documented — offline.

Every recipe validates with HF_HUB_OFFLINE=1 for the world size its header plans for; its
predicted peak memory fits the hardware the header names and is the number the header states;
recipes/README.md lists exactly the recipes on disk; every shipped config.json has the published
parameter count of its model; and the chat templates the chat recipes rely on render the format
the model was trained with, with only assistant turns trained.

When the memory model (dpkit/memory.py) changes, refresh the predicted peaks in the recipe headers
and recipes/README.md with:  python tests/unit/test_recipe_library.py --update-headers
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dpkit.recipe import load_recipe
from dpkit.shipped import TOKENIZERS, DATA as SHIPPED_DATA

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = TOKENIZERS / "tiny-bpe"
MESSAGES = SHIPPED_DATA / "self_instruct_seed.messages.jsonl"
RECIPES = ROOT / "recipes"
from dpkit.shipped import HUB_CONFIGS  # noqa: E402
ALL_YAML = sorted(p for p in RECIPES.rglob("*.y*ml") if HUB_CONFIGS not in p.parents)
LIBRARY = [p for p in ALL_YAML if p.parent.name != "quickstart"]  # quickstart: tests/e2e
GiB = 2**30

MODEL_DIRS = {"llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "qwen2.5-0.5b", "qwen2.5-1.5b",
              "qwen2.5-7b", "mistral-7b", "gemma-2-2b", "smollm2-360m", "smollm2-1.7b",
              "phi-3.5-mini"}
BIG = {"llama-3.1-8b", "qwen2.5-7b", "mistral-7b"}
GATED = ("meta-llama/", "google/gemma", "mistralai/")

# Published sizes: what each model card (or the Hub's safetensors metadata) states, in
# parameters; see dpkit/resources/hub_configs/SOURCES.md. Non-embedding counts where the card gives one.
PUBLISHED = {
    "meta-llama/Llama-3.2-1B": (1.23e9, None),
    "meta-llama/Llama-3.2-3B": (3.21e9, None),
    "meta-llama/Llama-3.1-8B": (8.03e9, None),
    "Qwen/Qwen2.5-0.5B": (0.49e9, 0.36e9),
    "Qwen/Qwen2.5-1.5B": (1.54e9, 1.31e9),
    "Qwen/Qwen2.5-7B": (7.61e9, 6.53e9),
    "mistralai/Mistral-7B-v0.3": (7.25e9, None),
    "google/gemma-2-2b": (2.61e9, None),
    "HuggingFaceTB/SmolLM2-360M": (360e6, None),
    "HuggingFaceTB/SmolLM2-1.7B": (1.7e9, None),
    "HuggingFaceTB/SmolLM2-360M-Instruct": (360e6, None),
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": (1.7e9, None),
    "microsoft/Phi-3.5-mini-instruct": (3.8e9, None),
    "Qwen/Qwen3-30B-A3B": (30.5e9, 29.9e9),
    "mistralai/Mixtral-8x7B-v0.1": (46.7e9, None),
    "deepseek-ai/DeepSeek-V2-Lite": (15.7e9, None),
}
# Mixtures of experts: the parameters one token runs through, as each card counts them (Qwen and
# Mistral with the embeddings, DeepSeek without the input embedding).
ACTIVE = {"Qwen/Qwen3-30B-A3B": (3.3e9, True), "mistralai/Mixtral-8x7B-v0.1": (12.9e9, True),
          "deepseek-ai/DeepSeek-V2-Lite": (2.4e9, False)}


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def header(path: Path) -> str:
    """The leading comment block as one string, wrapped lines joined, whitespace collapsed."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return " ".join(" ".join(lines).split())


def hardware(path: Path) -> dict:
    m = re.search(r"Hardware: (\d+) nodes? × (\d+) GPUs × (\d+) GB(?:, (\d+) GB CPU memory "
                  r"per node)?", header(path))
    assert m, f"{rel(path)}: header has no 'Hardware: N node × G GPUs × M GB' line"
    nodes, gpus, gpu_gb, cpu_gb = m.groups()
    return {"nodes": int(nodes), "gpus": int(gpus), "gpu_memory": int(gpu_gb) * GiB,
            "cpu_memory": int(cpu_gb) * GiB if cpu_gb else None}


@pytest.fixture
def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


# ----------------------------------------------------------------------------- inventory
def test_library_covers_every_model_and_method():
    assert len(LIBRARY) >= 25
    dirs = {p.parent.name for p in LIBRARY}
    assert MODEL_DIRS <= dirs, f"missing model directories: {MODEL_DIRS - dirs}"
    for d in MODEL_DIRS:
        names = [p.name for p in LIBRARY if p.parent.name == d]
        assert any("-full-zero" in n and "offload" not in n for n in names), d
        assert any(n.endswith("-lora-zero2.yaml") for n in names), d
        if d in BIG:
            assert any(n.endswith("-full-zero3-offload.yaml") for n in names), d
    formats = set()
    for p in LIBRARY:
        for s in load_recipe(p).data.sources:
            formats.add(s.format + (" mapped" if s.columns else ""))
    assert {"alpaca", "messages", "alpaca mapped"} <= formats


def test_file_names_say_method_and_stage():
    for p in LIBRARY:
        r = load_recipe(p)
        m = re.fullmatch(r"[a-z]+-(full|lora)-zero([0-3])(-offload)?\.yaml", p.name)
        assert m, f"{rel(p)}: name is not <task>-<method>-zero<N>[-offload].yaml"
        assert (m.group(1) == "lora") == (r.peft is not None), rel(p)
        assert int(m.group(2)) == r.zero.stage, rel(p)
        assert bool(m.group(3)) == (r.zero.offload_optimizer != "none"), rel(p)


def test_readme_table_lists_exactly_the_recipes_on_disk():
    readme = (RECIPES / "README.md").read_text()
    listed = re.findall(r"^\| \[`([^`]+\.yaml)`\]\(([^)]+)\)", readme, re.MULTILINE)
    assert all(a == b for a, b in listed), "link text and target differ"
    listed_paths = sorted(a for a, _ in listed)
    on_disk = sorted(str(p.relative_to(RECIPES)) for p in ALL_YAML)
    assert len(listed_paths) == len(set(listed_paths)), "a recipe is listed twice"
    assert listed_paths == on_disk, (f"missing from README: {set(on_disk) - set(listed_paths)}; "
                                     f"listed but not on disk: {set(listed_paths) - set(on_disk)}")


def test_readme_row_matches_recipe():
    readme = (RECIPES / "README.md").read_text()
    for p in LIBRARY:
        name = str(p.relative_to(RECIPES))
        row = next(line for line in readme.splitlines() if line.startswith(f"| [`{name}`]"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        r, hw = load_recipe(p), hardware(p)
        assert cells[1] == r.model.name_or_path, name
        assert cells[2] == (f"LoRA r={r.peft.r}" if r.peft else "full"), name
        assert cells[3].startswith(f"ZeRO-{r.zero.stage}"), name
        assert cells[4] == f"{hw['nodes']}×{hw['gpus']}×{hw['gpu_memory'] // GiB} GB", name
        assert cells[5].split()[0] == stated_peak(p)[0], name


def test_hub_configs_hold_no_yaml_and_are_all_documented():
    assert not list(HUB_CONFIGS.rglob("*.y*ml")), "tests/unit/test_recipe.py parses every yaml"
    sources = (HUB_CONFIGS / "SOURCES.md").read_text()
    for d in sorted({p.parent for p in HUB_CONFIGS.rglob("*.json")}):
        hub_id = str(d.relative_to(HUB_CONFIGS))
        assert f"`{hub_id}`" in sources, f"{hub_id}: say where its files came from in SOURCES.md"


# ------------------------------------------------------------------------------- headers
@pytest.mark.parametrize("path", LIBRARY, ids=rel)
def test_header_gives_launch_commands_license_and_measurements(path):
    text, r, hw = header(path), load_recipe(path), hardware(path)
    p, n = rel(path), hw["gpus"]
    for command in (f"dpkit train {p}",
                    (f"accelerate launch --config_file ds_configs/accelerate/single_node.yaml "
                     f"--num_processes {n} -m dpkit.train {p}"),
                    f"deepspeed --num_gpus {n} --module dpkit.train {p}",
                    f"HF_HUB_OFFLINE=1 dpkit validate {p} --nproc-per-node {n}",
                    (f"dpkit plan {p} --gpus-per-node {n} --nodes {hw['nodes']} "
                     f"--gpu-memory {hw['gpu_memory'] // GiB}GB")):
        assert command in text, f"{p}: header lacks `{command}`"
    assert "Measured: none yet" in text or re.search(r"Measured: \d{4}-\d{2}-\d{2}", text)
    gated = r.model.name_or_path.startswith(GATED)
    assert ("Gated: " in text) == gated, f"{p}: gated models must say so (and only they)"
    if gated:
        assert f"https://huggingface.co/{r.model.name_or_path}" in text
    assert f"--lora-rank {r.peft.r}" in text if r.peft else "--lora-rank" not in text


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize("path", LIBRARY, ids=rel)
def test_validates_offline_for_its_planned_world_size(path, offline):
    from dpkit.model import shipped_config_dir
    from dpkit.preflight import check_recipe

    recipe, hw = load_recipe(path), hardware(path)
    assert shipped_config_dir(recipe.model.name_or_path) is not None, (
        f"{rel(path)}: ship dpkit/resources/hub_configs/{recipe.model.name_or_path}/config.json")
    report = check_recipe(recipe, hw["nodes"] * hw["gpus"], on_cpu=False)
    assert report.problems == [], "\n".join(str(p) for p in report.problems)
    notes = "\n".join(report.notes)
    assert "offline: hub datasets" in notes  # the hub data is checked at launch, and says so


# ------------------------------------------------------------------------------ planning
def stated_peak(path: Path) -> tuple[str, str | None]:
    m = re.search(r"dpkit plan: ([\d.]+) GiB peak per GPU(?:, ([\d.]+) GiB CPU memory per node)?",
                  header(path))
    assert m, f"{rel(path)}: header has no 'dpkit plan: X GiB peak per GPU'"
    return m.group(1), m.group(2)


def planned(path: Path):
    from dpkit.plan.recommend import Hardware, fit, recipe_shape

    r, hw = load_recipe(path), hardware(path)
    lora = r.peft.r if r.peft else 0
    targets = None if not r.peft or r.peft.target_modules == "all-linear" else \
        r.peft.target_modules
    h = Hardware(hw["nodes"] * hw["gpus"], hw["gpus"], hw["gpu_memory"], hw["cpu_memory"])
    z = r.zero
    return fit(recipe_shape(r, lora, targets), r, z.stage, z.offload_optimizer, z.offload_params,
               h, [r.train.micro_batch_size]), r, hw


@pytest.mark.parametrize("path", LIBRARY, ids=rel)
def test_planned_peak_fits_its_hardware_and_is_the_stated_one(path):
    from dpkit.plan.recommend import check_fits

    option, r, hw = planned(path)
    b = option.breakdown
    assert option.fits, f"{rel(path)}: {option.why_not}"
    assert b.gpu_total <= 0.9 * hw["gpu_memory"], f"{rel(path)}: less than 10% headroom"
    lora = r.peft.r if r.peft else 0
    assert check_fits(r, hw["nodes"] * hw["gpus"], hw["gpus"], hw["gpu_memory"], lora_rank=lora,
                      cpu_memory_bytes=hw["cpu_memory"]) == []
    gpu, cpu = stated_peak(path)
    now = b.gpu_total / GiB
    assert abs(float(gpu) - now) <= max(0.05 * now, 0.1), (
        f"{rel(path)}: header says {gpu} GiB, dpkit plan now predicts {now:.1f} GiB — run "
        "`python tests/unit/test_recipe_library.py --update-headers`")
    if r.zero.offload_optimizer != "none":
        assert cpu is not None and abs(float(cpu) - b.cpu_per_node / GiB) <= 0.05 * float(cpu)


@pytest.mark.parametrize("path", [p for p in LIBRARY if "-full-" in p.name
                                  and "offload" not in p.name], ids=rel)
def test_full_recipes_use_the_lowest_stage_that_fits(path):
    from dpkit.plan.recommend import Hardware, fit, recipe_shape

    r, hw = load_recipe(path), hardware(path)
    shape = recipe_shape(r)
    h = Hardware(hw["nodes"] * hw["gpus"], hw["gpus"], hw["gpu_memory"])
    for stage in range(r.zero.stage):
        lower = fit(shape, r, stage, "none", "none", h, [r.train.micro_batch_size])
        assert not (lower.fits and lower.breakdown.gpu_total <= 0.9 * hw["gpu_memory"]), (
            f"{rel(path)}: ZeRO-{stage} fits too")


# -------------------------------------------------------------------- shipped configs
@pytest.mark.parametrize("hub_id", sorted(PUBLISHED))
def test_shipped_config_has_the_published_parameter_count(hub_id):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(HUB_CONFIGS / hub_id)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    published, non_embedding = PUBLISHED[hub_id]
    assert abs(total - published) / published < 0.02, f"{hub_id}: {total:,} vs {published:,.0f}"
    if non_embedding:  # Qwen's cards: without the input embedding and the output head
        embed = model.get_input_embeddings().weight.numel()
        head = 0 if config.tie_word_embeddings else model.get_output_embeddings().weight.numel()
        assert abs(total - embed - head - non_embedding) / non_embedding < 0.02


@pytest.mark.parametrize("hub_id", sorted(ACTIVE))
def test_mixture_of_experts_has_the_published_active_parameter_count(hub_id):
    from transformers import AutoConfig

    from dpkit.plan.shape import model_shape

    config = AutoConfig.from_pretrained(HUB_CONFIGS / hub_id)
    shape = model_shape(config)
    published, with_embedding = ACTIVE[hub_id]
    active = shape.active - (0 if with_embedding else config.vocab_size * config.hidden_size)
    assert abs(active - published) / published < 0.03, f"{hub_id}: {active:,} vs {published:,.0f}"
    assert shape.total == PUBLISHED_TOTALS[hub_id]  # the counts dpkit plan prints


# the totals counted on the meta device (SOURCES.md), against which the active count is taken
PUBLISHED_TOTALS = {"Qwen/Qwen3-30B-A3B": 30_532_122_624,
                    "mistralai/Mixtral-8x7B-v0.1": 46_702_792_704,
                    "deepseek-ai/DeepSeek-V2-Lite": 15_706_484_224}


@pytest.mark.parametrize("path", LIBRARY, ids=rel)
def test_model_builds_with_the_recipes_attention(path):
    # Validation reads only the config; building the model (on the meta device: no memory) is
    # what refuses an attention kernel the architecture lacks (Gemma-2 has no sdpa path).
    import torch
    from transformers import AutoModelForCausalLM

    from dpkit.model import load_model_config

    r = load_recipe(path)
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(load_model_config(r.model),
                                         attn_implementation=r.model.attn_implementation)


def test_every_model_the_library_names_is_shipped_and_counted():
    named = {load_recipe(p).model.name_or_path for p in LIBRARY}
    assert named == set(PUBLISHED)


# ------------------------------------------------------------------------ chat templates
def chat_tokenizer(hub_id: str):
    """The bundled tiny tokenizer carrying the chat template shipped for `hub_id`."""
    from transformers import AutoTokenizer

    shipped = json.loads((HUB_CONFIGS / hub_id / "tokenizer_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    tok.chat_template = shipped["chat_template"]
    return tok, shipped


CHAT = [p for p in LIBRARY if any(s.format == "messages" for s in load_recipe(p).data.sources)]
# What each family's chat format looks like, turn by turn (the model's trained format).
FORMATS = {
    "Qwen/": (("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
               "<|im_start|>user\n{u}<|im_end|>\n<|im_start|>assistant\n"), "{a}<|im_end|>\n"),
    "HuggingFaceTB/": (("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained "
                        "by Hugging Face<|im_end|>\n<|im_start|>user\n{u}<|im_end|>\n"
                        "<|im_start|>assistant\n"), "{a}<|im_end|>\n"),
    "microsoft/Phi-3.5": ("<|user|>\n{u}<|end|>\n<|assistant|>\n", "{a}<|end|>\n</s>"),
}


@pytest.mark.parametrize("path", CHAT, ids=rel)
def test_chat_recipe_renders_the_models_format_and_trains_only_the_answer(path):
    from dpkit.data import render

    r = load_recipe(path)
    tok, _ = chat_tokenizer(r.model.tokenizer_path)
    row = json.loads(MESSAGES.read_text().splitlines()[0])
    user, answer = (m["content"] for m in row["messages"])
    prompt, completion = next(v for k, v in FORMATS.items() if r.model.tokenizer_path.startswith(k))
    text, spans, _ = render(row, r.data.sources[0], tok, completion_only=True)
    assert text == prompt.format(u=user) + completion.format(a=answer)
    assert [text[a:b] for a, b in spans] == [completion.format(a=answer)]


MULTI_TURN = {"messages": [{"role": "user", "content": "Hi there"},
                           {"role": "assistant", "content": "Hello!"},
                           {"role": "user", "content": "What is 2+2?"},
                           {"role": "assistant", "content": "4."}]}


@pytest.mark.parametrize("hub_id", sorted({load_recipe(p).model.tokenizer_path for p in CHAT}))
def test_multi_turn_chat_trains_no_user_text(hub_id):
    from dpkit.data import render
    from dpkit.recipe import DataSource

    tok, _ = chat_tokenizer(hub_id)
    messages = MULTI_TURN["messages"]
    text, spans, _ = render(MULTI_TURN, DataSource(path="x.jsonl", format="messages"), tok, True)
    assert len(spans) == 2 and "Hello!" in text[slice(*spans[0])] and "4." in text[slice(*spans[1])]
    # The first answer's turn ends where the conversation so far stops being a prefix of the
    # whole conversation: nothing after that (the next user turn) may be trained on.
    so_far = tok.apply_chat_template(messages[:2], tokenize=False)
    shared = next((i for i, (x, y) in enumerate(zip(so_far, text)) if x != y), len(so_far))
    assert spans[0][1] <= shared, f"trained into the next turn: {text[shared:spans[0][1]]!r}"



# --------------------------------------------------------------------------- maintenance
PEAK = re.compile(r"dpkit plan: [\d.]+ GiB peak per GPU(?:, [\d.]+ GiB CPU memory per node)?")


def update_headers() -> None:
    """Write dpkit plan's current predictions into every header and the README table."""
    readme_path = RECIPES / "README.md"
    readme = readme_path.read_text()
    for path in LIBRARY:
        option, r, _ = planned(path)
        b, offload = option.breakdown, r.zero.offload_optimizer != "none"
        gpu, cpu = f"{b.gpu_total / GiB:.1f}", f"{b.cpu_per_node / GiB:.1f}"
        line = f"dpkit plan: {gpu} GiB peak per GPU" + (
            f", {cpu} GiB CPU memory per node" if offload else "")
        path.write_text(PEAK.sub(line, path.read_text(), count=1))
        name = str(path.relative_to(RECIPES))
        cell = gpu + (f" (+{cpu} CPU/node)" if offload else "")
        rows = readme.splitlines()
        for i, row in enumerate(rows):
            if row.startswith(f"| [`{name}`]"):
                cells = row.split(" | ")
                cells[5] = cell
                rows[i] = " | ".join(cells)
        readme = "\n".join(rows) + "\n"
        print(f"{name}: {cell} GiB")
    readme_path.write_text(readme)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--update-headers"]:
        raise SystemExit("usage: python tests/unit/test_recipe_library.py --update-headers")
    update_headers()
