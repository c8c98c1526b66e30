"""Check your exercises: `python -m minildm.check 03` runs chapter 03's checks on your code.

Each chapter has an exercise file, lessons/exercises/exNN_topic.py, in which you write the key
function(s) of that chapter yourself. The checks here call your functions and compare them with the
reference implementation in the package (the same properties the package's own tests assert), then
report, per exercise, PASS, FAIL (with exactly what differs: the inputs, the shapes, the largest
difference and where it is) or TODO (the stub still raises NotImplementedError).

    python -m minildm.check --list                 the chapters and their exercise files
    python -m minildm.check 01                     check lessons/exercises/ex01_forward_diffusion.py
    python -m minildm.check 03 --impl my_attn.py   check another file with the same function names
    python -m minildm.check all                    every chapter

The exit status is 0 only when every exercise checked passes. The test suite (tests/test_check.py)
runs the same checks on the package's own implementations, which must pass, and on deliberately wrong
answers, which must fail.

In files: compare.py (records and comparisons), chapters_01_05.py, chapters_06_09.py and chapter_10.py to chapter_12.py
(each chapter's checks; the reference answers are the package's own functions), runner.py (the table of
the chapters they declare, the command line). The exercise files are in the repository's
lessons/exercises/ (MINILDM_EXERCISES points elsewhere; `pip install` does not copy them).
"""
from .compare import (ROOT, EXERCISE_DIR, CheckFailed, Result, Chapter, describe, inputs, compare,
                      compare_number, unchanged, _gen, _randn)  # noqa: F401
from .chapters_01_05 import (_schedules, check_q_sample, check_x0_from_eps, reference_01, check_ddim_step,
                             _ddim_step_reference, _FakeConditionalModel, check_guidance, _ddim_eps,
                             check_ddim_sample, check_cfg_denoiser, reference_02, _tiny_attention,
                             _randomized, check_timestep_embedding, check_res_block, check_attention,
                             check_multi_head_attention, check_cross_attention, reference_03,
                             AWKWARD_PROMPT, _start_symbols, MERGE_CASES, TOY_RANKS, TOY_WORDS,
                             check_merge_pair, check_bpe, reference_04, _posterior, check_reparameterize,
                             check_gaussian_kl, reference_05)  # noqa: F401
from .chapters_06_09 import (check_training_loss, check_ema_update, reference_06, _unet_keys, check_ema_key,
                             check_unet_weights, _tiny_ldm, check_lora_merge, check_img2img_start,
                             check_inpaint_eps, reference_07, check_slerp, reference_08, _ask,
                             check_no_guidance, check_latent_scale, check_beta_schedule, check_eps_v,
                             check_no_ema, reference_09)  # noqa: F401
from .runner import (CHAPTERS, load_impl, run_chapter, format_results, main)  # noqa: F401
