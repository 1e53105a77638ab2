"""``p2r train --plan`` (trainer/plan.py) and the real-architecture presets it plans for
(``p2r models tiny --preset``): no GPU, no weights beyond a shrunken test checkpoint."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from p2r.trainer.config import TrainConfig
from p2r.trainer.plan import (
    GIB,
    RUNTIME_ALLOWANCE,
    Arch,
    arch_from_config,
    estimate,
    format_plan,
    load_arch,
    micro_batch_shape,
    parse_bytes,
)

ENDPOINTS = {"reasoner_endpoint": "reasoner:50051", "perceiver_endpoint": "perceiver:50051",
             "verifier_endpoint": "verifier:50051"}


def config(role: str = "perceiver", **overrides: Any) -> TrainConfig:
    """The reference configuration (64 prompts x 8 rollouts, kl_coef 0.01, default micro-batch)."""
    fields: dict[str, Any] = {"role": role, "model": "preset:qwen3-vl-4b", "data": Path("train.parquet"),
                              "output": "out", "prompts_per_step": 64, "rollouts_per_prompt": 8,
                              "kl_coef": 0.01, **ENDPOINTS, **overrides}
    return TrainConfig(**fields)


@pytest.fixture(scope="module")
def arch4b() -> Arch:
    return load_arch("preset:qwen3-vl-4b")


def closed_form_params(c: Any) -> int:
    """Qwen3-VL's parameter count from its config alone (modeling_qwen3_vl.py's layers)."""
    t, v = c.text_config, c.vision_config
    h, q, kv = t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    layer = h * q + 2 * h * kv + q * h + 2 * t.head_dim + 3 * h * t.intermediate_size + 2 * h
    text = t.vocab_size * h * (1 if c.tie_word_embeddings else 2) + t.num_hidden_layers * layer + h
    vh, vi, m = v.hidden_size, v.intermediate_size, v.hidden_size * v.spatial_merge_size**2
    block = 4 * vh + (3 * vh * vh + 3 * vh) + (vh * vh + vh) + (vh * vi + vi) + (vi * vh + vh)
    patch = v.in_channels * v.temporal_patch_size * v.patch_size**2 * vh + vh
    def merger(norm: int) -> int:
        return 2 * norm + m * m + m + m * v.out_hidden_size + v.out_hidden_size
    vision = (patch + v.num_position_embeddings * vh + v.depth * block + merger(vh)
              + len(v.deepstack_visual_indexes) * merger(m))
    return text + vision


# ------------------------------------------------------------------------------ presets


def test_presets_have_the_real_architecture_and_load_in_transformers(tmp_path: Path) -> None:
    from transformers import AutoConfig

    from p2r.models.tiny import preset_config

    preset_config("qwen3-vl-4b").save_pretrained(tmp_path / "4b")
    c = AutoConfig.from_pretrained(tmp_path / "4b")
    t, v = c.text_config, c.vision_config
    assert c.model_type == "qwen3_vl" and c.tie_word_embeddings and t.tie_word_embeddings
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.head_dim, t.vocab_size) == (2560, 9728, 36, 32, 8, 128, 151936)
    assert (t.rms_norm_eps, t.max_position_embeddings) == (1e-6, 262144)
    assert t.rope_parameters["rope_theta"] == 5_000_000
    assert t.rope_parameters["mrope_section"] == [24, 20, 20] and t.rope_parameters["mrope_interleaved"]
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.patch_size, v.spatial_merge_size,
            v.temporal_patch_size, v.out_hidden_size, v.num_position_embeddings, v.hidden_act) == (
        24, 1024, 4096, 16, 16, 2, 2, 2560, 2304, "gelu_pytorch_tanh")
    assert list(v.deepstack_visual_indexes) == [5, 11, 17]
    assert (c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id) == (
        151655, 151656, 151652, 151653)
    c8 = preset_config("qwen3-vl-8b")
    assert (c8.text_config.hidden_size, c8.text_config.intermediate_size, c8.vision_config.depth,
            c8.vision_config.hidden_size, c8.vision_config.out_hidden_size, c8.tie_word_embeddings) == (
        4096, 12288, 27, 1152, 4096, False)
    c2 = preset_config("qwen3-vl-2b")  # Qwen3-1.7B's text model, the 4B's vision tower
    t2, v2 = c2.text_config, c2.vision_config
    assert (t2.hidden_size, t2.intermediate_size, t2.num_hidden_layers, t2.num_attention_heads,
            t2.num_key_value_heads, t2.head_dim, t2.vocab_size, c2.tie_word_embeddings) == (
        2048, 6144, 28, 16, 8, 128, 151936, True)
    assert (v2.depth, v2.hidden_size, v2.intermediate_size, v2.out_hidden_size, list(v2.deepstack_visual_indexes)) == (
        24, 1024, 4096, 2048, [5, 11, 17])
    with pytest.raises(ValueError, match="unknown model preset"):
        preset_config("qwen3-vl-3b")


@pytest.mark.parametrize(("name", "expected"), [("qwen3-vl-4b", 4_437_815_808), ("qwen3-vl-8b", 8_767_123_696),
                                                ("qwen3-vl-2b", 2_127_532_032)])
def test_meta_parameter_count_is_the_closed_form(name: str, expected: int) -> None:
    from p2r.models.tiny import preset_config

    c = preset_config(name)
    arch = arch_from_config(c, name)
    assert arch.params == closed_form_params(c) == expected
    assert arch.tied == (name != "qwen3-vl-8b")
    assert arch.largest_tensor == c.text_config.vocab_size * c.text_config.hidden_size


def test_padded_tokenizer_and_sharded_writer(tmp_path: Path) -> None:
    """A shrunken preset (real vocabulary and token ids, 2 layers) written shard by shard loads in
    transformers with every key; tokenizer and processor load with the specials at real ids."""
    from PIL import Image
    from transformers import AutoProcessor, AutoTokenizer, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from p2r.models.tiny import PRESETS, QWEN_TOKEN_IDS, write_preset_model

    d = copy.deepcopy(PRESETS["qwen3-vl-4b"])
    d["text_config"].update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=64)
    d["text_config"]["rope_parameters"]["mrope_section"] = [12, 10, 10]
    d["vision_config"].update(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=128,
                              deepstack_visual_indexes=[1])
    small = Qwen3VLConfig(**d, **QWEN_TOKEN_IDS)
    out = write_preset_model(tmp_path / "m", small, shard_bytes=16 * 2**20)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    model, info = Qwen3VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 151669 and tok.eos_token_id == 151645 and tok.pad_token_id == 151643
    assert tok.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]) == [
        151652, 151653, 151655, 151656]
    processor = AutoProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    ids = processor(text=[text], images=[Image.new("RGB", (64, 64))], return_tensors="pt")["input_ids"][0]
    assert ids.tolist().count(151655) == 4 and int(ids.max()) < 151936
    assert arch_from_config(small, "small").params == load_arch(f"file://{out}").params


# ------------------------------------------------------------------------ the estimate


@pytest.mark.parametrize("role", ["perceiver", "reasoner"])
def test_reference_run_fits_four_80gib_gpus(role: str, arch4b: Arch) -> None:
    cfg = config(role)
    plan = estimate(cfg, arch4b, 4, 80 * GIB)
    assert plan.fits and plan.error_line() is None
    assert set(plan.phases) == {"rollout", "reference", "update", "push"}
    update = plan.phases["update"]
    assert update["optimiser"] == 2 * update["params"] == 2 * update["grads"]
    assert update["reference"] == plan.params // 2  # bf16 vs fp32, same shards
    # The policy gathered whole in bf16 through the step, its unsharded gradients in fp32 (no
    # reduce-scatter until the last micro-batch), plus one unit's fresh bf16 grads and fp32 buffer.
    assert update["gathered"] == arch4b.params * 2
    assert update["unsharded_grads"] == arch4b.params * 4 + arch4b.unit_numel * 6
    reference = plan.phases["reference"]  # the reference gathered whole, once, before the policy's pass
    assert reference["reference_gathered"] == arch4b.params * 2 and "gathered" not in reference
    assert "grads" not in reference and reference["activations"] < update["activations"]
    assert plan.phases["rollout"].keys() == {"engine_weights", "engine_runtime", "kv_cache", "allowance"}
    assert plan.allowance == RUNTIME_ALLOWANCE == 5 * GIB // 2  # one CUDA context: the engine is in-process
    share = int(cfg.gpu_memory_utilization * 80 * GIB)
    assert plan.engine_weights + plan.engine_runtime + plan.kv_cache == share
    assert plan.kv_bytes_per_token == 2 * 36 * 8 * 128 * 2
    # 16 prompts x 8 rollouts per engine run at once; the 8 rollouts of a prompt share its KV blocks.
    assert plan.rollouts_per_rank == 128
    assert plan.kv_tokens_needed == 16 * cfg.max_prompt_tokens + 128 * cfg.max_response_tokens
    assert plan.weight_push >= arch4b.largest_tensor * 2 * 2
    table = format_plan(plan, cfg)
    for label in ("params (fp32, sharded)", "grads (fp32, sharded)", "AdamW states (2x fp32, sharded)",
                  "reference model (bf16, sharded)", "reference gathered, whole (bf16)", "policy gathered (bf16)",
                  "unsharded grads (fp32, accumulated)", "activations (one micro-batch)", "engine weights (bf16 / TP)",
                  "KV cache (rest of engine share)", "weight push (largest tensor)", "fits",
                  "collectives per rank per step", "start-up", "checkpoint"):
        assert label in table, label


def test_one_24gib_gpu_does_not_fit_and_names_the_largest_term(arch4b: Arch) -> None:
    plan = estimate(config(), arch4b, 1, 24 * GIB)
    assert not plan.fits and plan.peak_phase == "update"
    assert plan.largest_term() == ("optimiser", plan.optimiser)
    line = plan.error_line()
    assert line is not None and "\n" not in line and "AdamW states (2x fp32, sharded)" in line


def test_terms_scale_as_the_sharding_and_micro_batch_say(arch4b: Arch) -> None:
    two, four = estimate(config(), arch4b, 2, 80 * GIB), estimate(config(), arch4b, 4, 80 * GIB)
    for term in ("params", "grads", "optimiser", "reference"):
        assert getattr(four, term) == pytest.approx(getattr(two, term) / 2, rel=1e-3), term
    assert four.activations == two.activations and four.engine_weights == two.engine_weights
    base = estimate(config(), arch4b, 4, 80 * GIB).activations
    more_prompts = estimate(config(prompts_per_step=512), arch4b, 4, 80 * GIB).activations
    assert more_prompts == base
    # Without a token budget, a micro-batch is micro_batch_size full-length sequences: linear in it.
    fixed = estimate(config(micro_batch_size=4, max_tokens_per_micro_batch=None), arch4b, 4, 80 * GIB).activations
    bigger_micro = estimate(config(micro_batch_size=8, max_tokens_per_micro_batch=None), arch4b, 4,
                            80 * GIB).activations
    assert bigger_micro.total == pytest.approx(2 * fixed.total, rel=1e-6)
    # With one (16,384 tokens, the default), the budget caps it: 4 full-length perceiver sequences
    # (14,336 tokens), whatever the cap on responses above that.
    cfg = config()
    assert cfg.max_tokens_per_micro_batch == 16384 and cfg.micro_batch_size == 8
    assert micro_batch_shape(cfg) == (4, 16384, 6)  # 4 at full length, 16,384 tokens, 6 short ones
    assert estimate(config(micro_batch_size=64), arch4b, 4, 80 * GIB).activations == base
    assert base.logits == fixed.logits and base.layer_inputs > fixed.layer_inputs  # 16,384 vs 14,336 tokens
    assert micro_batch_shape(config("reasoner")) == (1, 16384, 1)  # one 10,752-token sequence per micro-batch
    no_ckpt = estimate(config(gradient_checkpointing=False), arch4b, 4, 80 * GIB).activations
    assert no_ckpt.layer_inputs > 5 * base.layer_inputs and no_ckpt.recompute == 0


def test_reference_offload_kl_off_sleep_off_and_actor_resident(arch4b: Arch) -> None:
    on = estimate(config(), arch4b, 4, 80 * GIB)
    assert estimate(config(kl_coef=0.0), arch4b, 4, 80 * GIB).reference == 0
    host = estimate(config(ref_cpu_offload=True), arch4b, 4, 80 * GIB)
    assert host.reference == 0 and host.reference_host == on.reference
    resident = estimate(config(actor_offload=False), arch4b, 4, 80 * GIB)
    assert {"params", "optimiser", "reference", "cached"} <= resident.phases["rollout"].keys()
    assert resident.total("rollout") > on.total("rollout") + on.optimiser
    awake = estimate(config(enable_sleep_mode=False), arch4b, 4, 80 * GIB)
    assert awake.phases["update"]["engine_awake"] == int(0.8 * 80 * GIB) and not awake.fits


def test_engine_that_cannot_hold_one_sequence_is_the_error(arch4b: Arch) -> None:
    plan = estimate(config(gpu_memory_utilization=0.1), arch4b, 8, 80 * GIB)
    assert not plan.fits and plan.problem is not None and "KV cache" in plan.problem
    with pytest.raises(ValueError, match="does not divide"):
        estimate(config(rollout_tensor_parallel_size=3), arch4b, 4, 80 * GIB)


def test_cpu_ranks_have_no_engine_terms(arch4b: Arch) -> None:
    plan = estimate(config(), arch4b, 2, 64 * GIB, cpu=True)
    assert set(plan.phases) == {"reference", "update", "push"} and plan.dtype == "fp32"
    assert plan.engine_weights == plan.kv_cache == plan.allowance == 0
    assert plan.reference == plan.params  # fp32 reference on CPU
    assert "engine" not in " ".join(k for terms in plan.phases.values() for k in terms)


def test_collectives_per_rank_per_step_at_the_reference_shapes(arch4b: Arch) -> None:
    """4 GPUs, 64 prompts x 8 rollouts, stage 1: one gather of the policy and of the reference,
    one reduce-scatter of the fp32 gradients and a bf16 push per step, under 0.15 TB per rank; the
    previous schedule (micro-batches of 4, a gather of each model in the forward, again in the
    backward, and a reduce-scatter per micro-batch, an fp32 push) was about 1 TB."""
    full = arch4b.sharded(4) * 4  # padded elements
    ring = 3 / 4
    now = estimate(config(), arch4b, 4, 80 * GIB).collectives
    assert now.policy_forward == now.reference == now.weight_push == full * 2 * ring
    assert now.policy_backward == 0 and now.grad_reduce_scatter == full * 4 * ring
    assert now.total == full * ring * (2 + 2 + 4 + 2) and now.total <= 0.15e12
    assert now.checkpoint_export == full * 2 * ring  # the HF export gathered in bf16
    before = estimate(config(micro_batch_size=4, max_tokens_per_micro_batch=None), arch4b, 4, 80 * GIB,
                      schedule="micro-batch").collectives
    assert before.micro_batches == 16 * 2 == now.micro_batches  # 16 prompts per rank, 2 micro-batches each
    assert before.policy_forward == before.policy_backward == before.reference == 32 * full * 2 * ring
    assert before.grad_reduce_scatter == 32 * full * 4 * ring and before.weight_push == full * 4 * ring
    assert 1.0e12 < before.total < 1.1e12 and before.total > 30 * now.total
    assert estimate(config(kl_coef=0.0), arch4b, 4, 80 * GIB).collectives.reference == 0
    assert estimate(config(), arch4b, 1, 80 * GIB).collectives.total == 0  # one rank sends nothing


def test_host_peaks_startup_and_checkpoint(arch4b: Arch) -> None:
    plan = estimate(config(), arch4b, 4, 80 * GIB)
    assert plan.host_startup == arch4b.params * 4  # the whole fp32 policy, per rank, before sharding
    assert plan.host_checkpoint == plan.host_per_rank + 2 * arch4b.params * 2  # bf16 model + its serialised copy
    before = estimate(config(), arch4b, 4, 80 * GIB, schedule="micro-batch")
    assert before.host_checkpoint == plan.host_checkpoint + arch4b.params * 4  # the fp32 full state dict too
    with pytest.raises(ValueError, match="schedule"):
        estimate(config(), arch4b, 4, 80 * GIB, schedule="never")  # type: ignore[arg-type]


def test_parse_bytes_and_model_errors() -> None:
    assert parse_bytes("80GiB") == 80 * GIB and parse_bytes("24GB") == 24 * 10**9 and parse_bytes("1024") == 1024
    assert parse_bytes("1.5 TiB") == int(1.5 * 2**40)
    with pytest.raises(ValueError, match="--gpu-memory"):
        parse_bytes("lots")
    with pytest.raises(ValueError, match="preset:NAME"):
        load_arch("s3://bucket/model")


# --------------------------------------------------------------------------------- CLI


def _stage_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "stage.yaml"
    path.write_text("model: preset:qwen3-vl-4b\ndata: train.parquet\noutput: out\nkl_coef: 0.01\n"
                    "prompts_per_step: 64\nrollouts_per_prompt: 8\n"
                    + "".join(f"{k}: {v}\n" for k, v in ENDPOINTS.items()))
    return path


def _run(*args: str) -> Any:
    from p2r.cli import cli

    return CliRunner().invoke(cli, list(args), prog_name="p2r")


@pytest.mark.parametrize("role", ["perceiver", "reasoner"])
def test_cli_plan_prints_the_table_and_exits_0(tmp_path: Path, role: str) -> None:
    result = _run("train", "--plan", "--role", role, "--config", str(_stage_yaml(tmp_path)), "--gpus", "4",
                  "--gpu-memory", "80GiB")
    assert result.exit_code == 0, result.output
    assert f"role {role}, 4 x 80.00 GiB per GPU" in result.stdout and "fits" in result.stdout
    assert "AdamW states (2x fp32, sharded)" in result.stdout


def test_cli_plan_that_does_not_fit_is_one_line_exit_2(tmp_path: Path) -> None:
    result = _run("train", "--plan", "--role", "perceiver", "--config", str(_stage_yaml(tmp_path)), "--gpus", "1",
                  "--gpu-memory", "24GiB")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("p2r: error: plan: does not fit: the update phase")
    assert "largest term: AdamW states" in lines[0]


def test_cli_plan_options_need_plan_and_presets_match(tmp_path: Path) -> None:
    from p2r.cli import MODEL_PRESETS
    from p2r.models.tiny import PRESETS

    result = _run("train", "--role", "perceiver", "--config", str(_stage_yaml(tmp_path)), "--gpus", "4")
    assert result.exit_code == 2 and "go with --plan" in result.stderr
    result = _run("train", "--plan", "--role", "perceiver", "--config", str(_stage_yaml(tmp_path)))
    assert result.exit_code == 2 and "--plan needs --gpu-memory" in result.stderr
    assert MODEL_PRESETS[1:] == tuple(PRESETS)
    result = _run("models", "tiny", str(tmp_path / "a"), "--out", str(tmp_path / "b"))
    assert result.exit_code == 2 and "OUT or --out" in result.stderr


# ------------------------------------------------------------------- bench/gpu_step.py


def test_gpu_step_plans_the_2b_on_one_80gib_gpu_and_says_when_there_is_no_gpu(tmp_path: Path) -> None:
    """The device check's CPU-safe side: its stage-1 config at the reference shapes and the plan it
    prints beside the measured peaks (the 2B preset fits one 80 GiB GPU; the 4B would not: its
    AdamW state alone is 33 GiB there). Without a GPU the script says so in one line, exit 2."""
    import subprocess
    import sys

    import torch

    from bench.gpu_step import NO_GPU, PHASES, plan_rows, stage1_config

    cfg = stage1_config("preset:qwen3-vl-2b", tmp_path / "train.parquet", tmp_path)
    assert (cfg.prompts_per_step, cfg.rollouts_per_prompt, cfg.max_prompt_tokens, cfg.max_response_tokens,
            cfg.max_pixels, cfg.max_steps) == (64, 8, 2560, 1024, 2_097_152, 1)
    two = plan_rows(cfg, load_arch("preset:qwen3-vl-2b"), 1, 80 * GIB)
    assert two["fits"] and set(two["phases"]) <= set(PHASES) and two["collectives_tb"] == 0  # one rank
    assert not plan_rows(cfg, load_arch("preset:qwen3-vl-4b"), 1, 80 * GIB)["fits"]
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script would run the whole step")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, str(root / "bench" / "gpu_step.py"), "--out", str(tmp_path / "o.json")],
                            cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout.strip() == NO_GPU and not (tmp_path / "o.json").exists()
