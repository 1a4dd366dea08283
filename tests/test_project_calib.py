"""scripts/project_calib.py: a calib=paper run on a large model, projected from SmolLM2's measured step."""

from __future__ import annotations

import pytest
from conftest import load_script

project_calib = load_script("project_calib")


def test_the_shapes_count_the_published_parameters_of_their_linears():
    # Llama-3-8B: 8.03 B parameters, of which the 128256 x 4096 input embedding (0.53 B) multiplies no token.
    assert project_calib.SHAPES["llama3-8b"].linear_params() == pytest.approx(8.03e9 - 128256 * 4096, rel=0.01)
    # SmolLM2-135M ties its embedding to the lm_head: every one of its 134.5 M parameters multiplies.
    assert project_calib.SHAPES["smollm2-135m"].linear_params() == pytest.approx(134.5e6, rel=0.01)


def test_a_forward_is_two_flops_per_parameter_per_token_plus_causal_attention():
    shape = project_calib.Shape(hidden=8, layers=1, intermediate=16, vocab=10, heads=2, kv_heads=1, head_dim=4)
    params = 8 * 4 * (2 * 2 + 2 * 1) + 3 * 8 * 16 + 8 * 10
    assert shape.linear_params() == params
    assert shape.forward_flops(3, 5) == 2 * params * 15 + 2 * 2 * 1 * 2 * 4 * 5 * 15 / 2


def test_calib_paper_is_64_steps_and_the_projection_scales_with_the_measured_ratio():
    calib = project_calib.calib_settings("paper")
    assert (calib["n_samples"], calib["seq_len"], calib["batch_size"]) == (128, 2048, 4)
    assert project_calib.steps_of(calib) == 64
    target = project_calib.SHAPES["llama3-8b"]
    one, two = (project_calib.projection(target, calib, ratio, [100.0]) for ratio in (1.0, 2.0))
    forward = target.forward_flops(4, 2048)  # recomputed once under activation checkpointing
    assert one[2][1] == pytest.approx(3 * forward + forward) and two[2][1] == pytest.approx(6 * forward + forward)
    assert two[3][1] == pytest.approx(64 * two[2][1])
    assert two[3][2] == f"{64 * two[2][1] / 100e12 / 60:.1f} min"


def test_a_step_measured_with_checkpointing_is_not_given_a_second_recomputed_forward():
    calib = project_calib.calib_settings("paper")
    assert calib["grad_checkpointing"]
    target = project_calib.SHAPES["llama3-8b"]
    forward = target.forward_flops(4, 2048)
    measured_on_gpu = project_calib.projection(target, calib, 3.52, [100.0], measured=target,
                                               measured_batch=(4, 2048), step_includes_recompute=True)
    assert measured_on_gpu[2][1] == pytest.approx(3.52 * 3 * forward)
    assert "+ recompute" not in measured_on_gpu[2][0]
