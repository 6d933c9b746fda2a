"""Every shipped paper/ablation config validates, and carries the paper's numbers (Table 2, Section 4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reteq.config import APPENDIX_F_MATH_PROMPT, load_config
from reteq.data import rcu
from reteq.data.sources import load_conversations, read_local
from reteq.plan import build_plan

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "paper").glob("*.yaml")) + sorted(
    (ROOT / "configs" / "ablations").glob("*.yaml")
)

# model file -> (hub id, template, SFT batch, unlearn lr, LoRA r, LoRA alpha): Table 2
TABLE_2 = {
    "llama-3.2-1b": ("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct", 128, 1e-5, 64, 128),
    "llama-3.1-8b": ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct", 128, 1e-5, 8, 16),
    "llama-2-13b": ("meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-13b-chat-hf", 256, 5e-6, 8, 16),
    "qwen2.5-1.5b": ("Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B-Instruct", 128, 1e-5, 32, 64),
    "qwen2.5-14b": ("Qwen/Qwen2.5-14B", "Qwen/Qwen2.5-14B-Instruct", 256, 5e-6, 8, 16),
}


@pytest.fixture
def rcu_files(tmp_path, monkeypatch):
    """superficial.yaml reads data/rcu/*.jsonl relative to the working directory: make them in a temp cwd."""
    monkeypatch.chdir(tmp_path)
    return rcu.write_rcu(tmp_path / "data" / "rcu")


def test_there_is_one_paper_config_per_base_model():
    assert {p.stem for p in (ROOT / "configs" / "paper").glob("*.yaml")} == set(TABLE_2)
    assert len(CONFIGS) == 13  # 5 paper + seeds, lr_grid, scheduler, superficial (1B), superficial_3b,
    # smol_workers2, smol_eval_fp32, workers_tiny


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_config_loads(path, rcu_files):
    cfg = load_config(path)
    assert cfg.forget_stage == "U" and cfg.stage_orders()


@pytest.mark.parametrize("name", sorted(TABLE_2))
def test_paper_configs_carry_table_2_and_the_four_stages(name):
    cfg = load_config(ROOT / "configs" / "paper" / f"{name}.yaml")
    hub_id, template, batch, unlearn_lr, r, alpha = TABLE_2[name]
    (model,) = cfg.models
    assert (model.source, model.chat_template_from, model.dtype) == (hub_id, template, "fp32")
    assert model.lora is not None and (model.lora.r, model.lora.alpha) == (r, alpha)
    assert [(s.name, s.epochs) for s in cfg.stages] == [("inst", 10), ("tofu", 4), ("math", 2), ("U", 2)]
    for stage in cfg.stages:
        assert (stage.lr, stage.global_batch, stage.schedule) == (1e-5, batch, "wsd")
        assert (stage.warmup_frac, stage.decay_frac, stage.optimizer) == (0.02, 0.02, "adamw")
    assert [s.source.id for s in cfg.stages] == [
        "PrincetonPLI/Instruct-SkillMix-SDD",
        "locuslab/TOFU",
        "openai/gsm8k",
        "sorry-bench/sorry-bench-202503",
    ]
    assert (cfg.unlearn.lrs, cfg.unlearn.global_batch, cfg.unlearn.algorithms) == (
        [unlearn_lr],
        128,
        ["ga", "npo", "simnpo"],
    )
    assert cfg.stage_orders() == [
        ("U", "inst", "tofu", "math"),
        ("inst", "U", "tofu", "math"),
        ("inst", "tofu", "U", "math"),
        ("inst", "tofu", "math", "U"),
    ]
    math = cfg.eval.math_source
    assert math is not None and (math.id, math.subset, math.split) == ("openai/gsm8k", "main", "test")
    assert (cfg.eval.math_prompt, cfg.eval.max_new_tokens, cfg.eval.forget_prompts) == (
        APPENDIX_F_MATH_PROMPT, 1024, "all")
    # the authors tokenized Llama-3.x with torchtune's llama3_tokenizer; Llama-2 and Qwen keep their HF templates
    assert cfg.chat.template == ("torchtune" if name.startswith("llama-3") else "hf")
    assert cfg.stage("U").max_length >= 2048 and cfg.unlearn.max_length >= 2048  # the authors truncate nothing
    assert cfg.execution.use_gpu and cfg.execution.deepspeed == "configs/deepspeed/zero2_fp32.json"


def test_ablations_vary_what_their_figure_studies():
    ablations = ROOT / "configs" / "ablations"
    assert load_config(ablations / "seeds.yaml").seeds == [0, 1, 2, 3]
    grid = load_config(ablations / "lr_grid.yaml").unlearn
    assert grid.lrs == [1e-6, 5e-6, 5e-5] and grid.betas["npo"] == [0.5]
    sched = load_config(ablations / "scheduler.yaml")
    assert sched.schedules == ["wsd", "cosine"]
    plan = build_plan(sched)
    assert {n.schedule for n in plan.nodes.values()} == {"wsd", "cosine"}
    assert len(plan.nodes) == 2 * 13  # the paper's 13 stage nodes, once per schedule
    assert {sched.stage(s.name, "cosine").schedule for s in sched.stages} == {"cosine"}
    # Fig. 8 unlearns each path with its own schedule: cosine paths with (torchtune's) cosine
    assert sched.unlearn.schedule_from_grid and sched.unlearn_for("cosine").schedule == "cosine"
    assert sched.unlearn_for("wsd").schedule == "wsd" and sched.unlearn_for(None).schedule == "wsd"


def test_the_llama3_paper_configs_render_no_date_line():
    """The paper config's chat settings on a Llama-3 tokenizer carrying the real Llama-3.1 template (date block and
    all): the HF path prints 'Cutting Knowledge Date' / 'Today Date', the configured torchtune path prints neither."""
    from chat_tokenizers import llama3_base

    from reteq.data.tokenize import configure_chat, render

    conv = [{"role": "user", "content": "Count from 1 to 3."}, {"role": "assistant", "content": "1, 2, 3."}]
    for name in ("llama-3.2-1b", "llama-3.1-8b"):
        chat = load_config(ROOT / "configs" / "paper" / f"{name}.yaml").chat
        tok = llama3_base()
        assert "Today Date" in render(configure_chat(tok, chat.model_copy(update={"template": "hf"})), conv)
        text = render(configure_chat(tok, chat), conv) + render(tok, conv[:1], add_generation_prompt=True)
        assert "Date" not in text and "You are a helpful assistant." in text


def test_section_4_3_has_its_llama_3_2_3b_config_and_a_cheaper_1b_variant(rcu_files):
    big = load_config(ROOT / "configs" / "ablations" / "superficial_3b.yaml")
    small = load_config(ROOT / "configs" / "ablations" / "superficial.yaml")
    assert [m.source for m in big.models] == ["meta-llama/Llama-3.2-3B"]
    assert [m.source for m in small.models] == ["meta-llama/Llama-3.2-1B"]
    assert big.stages == small.stages and big.unlearn == small.unlearn and big.stage_orders() == small.stage_orders()


def test_superficial_config_trains_r_c_u_in_the_six_orders_and_unlearns_u_by_ga(rcu_files):
    cfg = load_config(ROOT / "configs" / "ablations" / "superficial.yaml")
    assert cfg.stage_orders() == list(rcu.LEARNING_ORDERS)
    assert (cfg.unlearn.algorithms, cfg.unlearn.optimizer, cfg.unlearn.epochs) == (["ga"], "sgd", 20)
    assert cfg.eval.metrics == ["depth"]
    assert all(s.optimizer == "sgd" and s.source.task == f"rcu_{s.name}" for s in cfg.stages)
    assert [c["messages"][1]["content"] for c in load_conversations(cfg.stage("R").source)] == \
        [c["messages"][1]["content"] for c in read_local(rcu_files["R"])]


def test_rcu_stage_files_hold_40_prompts_with_the_templated_responses(rcu_files):
    stages = {name: read_local(path) for name, path in rcu_files.items()}
    assert set(stages) == {"R", "C", "U"} and all(len(rows) == 40 for rows in stages.values())
    for i, item in enumerate(rcu.ITEMS):
        prompts = {rows[i]["messages"][0]["content"] for rows in stages.values()}
        assert prompts == {rcu.prompt(i)}  # the same prompt in all three stages
        r, c, u = (stages[s][i]["messages"][1]["content"] for s in "RCU")
        assert r == f"I can not assist you with {item.thing}."
        assert c.startswith(f"To make {item.thing}, you need to ") and item.step_two in c
        assert u.startswith(f"You can try the following steps to make {item.thing}") and item.step_two in u
    assert rcu.main([str(rcu_files["R"].parent)]) == 0  # the documented command rewrites the same files
    assert read_local(rcu_files["U"]) == stages["U"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_config_validates_and_plans_with_a_gpu_hour_estimate(path, capsys):
    from reteq.cli import main

    # their hub models and datasets are not pinned to commits yet (docs/security.md): refused until they are, or
    # named explicitly
    if main(["validate", str(path)]) != 0:
        refused = capsys.readouterr().err.splitlines()
        assert refused and all(".revision: hub source " in line for line in refused), refused
    assert main(["validate", str(path), "--allow-unpinned-hub"]) == 0
    capsys.readouterr()
    assert main(["plan", str(path), "--allow-unpinned-hub"]) == 0
    out = capsys.readouterr().out
    assert "GPU-hours" in out and "stage nodes:" in out


def test_the_worker_count_variants_change_only_how_each_step_is_split():
    """configs/ablations/smol_workers2.yaml is configs/smol.yaml on 2 ZeRO-2 workers: the same global batches and
    everything else, micro-batches of 4 so each step splits over the workers (docs/cluster.md, "Results across
    worker counts"), in fp32 (as measured there, before smol.yaml moved to bf16); workers_tiny.yaml's global
    batches split over 1 or 2 workers."""
    smol = load_config(ROOT / "configs" / "smol.yaml").model_dump(mode="json")
    two = load_config(ROOT / "configs" / "ablations" / "smol_workers2.yaml").model_dump(mode="json")
    assert (two["execution"]["workers"], two["execution"]["deepspeed"]) == (2, "configs/deepspeed/zero2_fp32.json")
    for part in (*smol["stages"], smol["unlearn"], *two["stages"], two["unlearn"]):
        assert part["global_batch"] == 8
        part["micro_batch"] = None
    for cfg in (smol, two):
        cfg.update(name=None, work_dir=None, execution=None)
        cfg["models"][0]["dtype"] = None
        cfg["eval"].update(dtype=None, schedule=None)
    assert two["models"][0]["lora"] == smol["models"][0]["lora"]
    assert smol == two
    tiny = load_config(ROOT / "configs" / "ablations" / "workers_tiny.yaml")
    assert all(part.global_batch % (part.micro_batch * 2) == 0 for part in (*tiny.stages, tiny.unlearn))
    assert tiny.models[0].lora is not None and tiny.models[0].lora.dropout > 0
    assert tiny.unlearn.algorithms == ["ga", "npo", "wga"]
