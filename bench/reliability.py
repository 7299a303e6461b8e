"""Write docs/reliability.md: each reliability promise, the test that checks it, and its last result.

    python bench/reliability.py      (make reliability)

Runs exactly the tests listed below (real processes, signals, DVC and a
Prefect server; a few minutes on 2 cores) and records pass/fail and time.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._util import machine  # noqa: E402

DOC = ROOT / "docs" / "reliability.md"

#: (promise, [test node ids]) in the order the page lists them.
PROMISES = [
    (
        "Killing `segflow run` with SIGKILL mid-training stops the stage, its DVC process and its leash within "
        "seconds; the flow run is marked CRASHED; the last good model and metrics are back byte for byte; no "
        "debris; DVC's lock is free",
        [
            "tests/test_reliability.py::test_killing_segflow_run_mid_training_stops_everything_and_keeps_the_outputs[SIGKILL]"
        ],
    ),
    (
        "SIGTERM and Ctrl-C (SIGINT to the process group) do the same, print one line and exit 143 / 130",
        [
            "tests/test_reliability.py::test_killing_segflow_run_mid_training_stops_everything_and_keeps_the_outputs[SIGTERM]",
            "tests/test_reliability.py::test_killing_segflow_run_mid_training_stops_everything_and_keeps_the_outputs[SIGINT]",
        ],
    ),
    (
        "After those kills the next `segflow run` works at once and leaves nothing behind",
        ["tests/test_reliability.py::test_after_the_kills_the_next_run_works_at_once"],
    ),
    (
        "A killed `segflow run` leaves no temporary Prefect server running",
        ["tests/test_reliability.py::test_sigkill_with_the_temporary_server_leaves_no_server_behind"],
    ),
    (
        "A second `segflow run` on a busy project fails at once with one line naming the first one's PID",
        ["tests/test_reliability.py::test_two_runs_at_once_the_second_names_the_first"],
    ),
    (
        "A training stage killed with SIGKILL mid-epoch resumes from its last completed epoch on the next run "
        "and ends with weights bit-identical to an uninterrupted run (CPU); a checkpoint of other params is not "
        "resumed; a finished run leaves no checkpoints",
        [
            "tests/test_training_runs.py::test_a_killed_run_resumes_and_ends_bit_identical_to_an_uninterrupted_one",
            "tests/test_training_runs.py::test_a_checkpoint_of_other_params_data_or_code_is_not_resumed",
        ],
    ),
    (
        "A loss that becomes NaN or infinite stops training with one line naming epoch, step and likely causes; "
        "no model is written",
        ["tests/test_training_runs.py::test_a_nan_loss_stops_the_run_with_one_line_naming_epoch_step_and_causes"],
    ),
    (
        "A bad params value or bad data under plain `dvc repro` fails with one line and leaves every output "
        "(data, model, git-tracked metrics and curves) byte-identical",
        [
            "tests/test_reliability.py::test_a_failing_stage_keeps_the_last_good_outputs[bad-value]",
            "tests/test_reliability.py::test_a_failing_stage_keeps_the_last_good_outputs[bad-data]",
            "tests/test_reliability.py::test_corrupt_training_data_keeps_the_last_good_model",
        ],
    ),
    (
        "`train.accelerator: gpu` without a GPU is one line, and the outputs stay",
        ["tests/test_reliability.py::test_gpu_accelerator_without_a_gpu_is_one_line_and_keeps_the_outputs"],
    ),
    (
        "A failing stage in the Prefect flow stops the flow with its own one-line error and the last good model",
        [
            # (the first test gives the project the good run the second one must keep)
            "tests/test_pipeline.py::test_dvc_repro_runs_the_whole_pipeline_then_nothing",
            "tests/test_pipeline.py::test_failing_stage_stops_the_flow_with_its_one_line_error",
        ],
    ),
    (
        "`paths.*` outside the project (absolute, `..`, through a symbolic link) is refused before anything runs",
        [
            "tests/test_reliability.py::test_outputs_outside_the_project_are_refused_before_anything_runs",
            "tests/test_params.py::test_outputs_must_stay_inside_the_project",
            "tests/test_params.py::test_outputs_may_not_leave_through_a_symbolic_link",
        ],
    ),
    (
        "YAML errors give file:line:column; a missing params.yaml says where it looked",
        ["tests/test_params.py::test_file_errors_are_one_line"],
    ),
    (
        "A write killed half-way leaves only a hidden, git-ignored temporary, removed by the next write; scratch "
        "of dead processes is pruned",
        [
            "tests/test_safety.py::test_a_killed_write_leaves_hidden_debris_that_the_next_write_removes",
            "tests/test_safety.py::test_scratch_of_dead_processes_is_pruned",
        ],
    ),
    (
        "No code path unpickles a file (`torch.load(weights_only=True)` at most, training checkpoints included); "
        "servers bind to 127.0.0.1",
        [
            "tests/test_safety.py::test_no_code_path_unpickles_a_file",
            "tests/test_safety.py::test_servers_bind_to_loopback_only",
        ],
    ),
    (
        "Credentials in the environment reach no log, artifact, flow/task run or output file",
        ["tests/test_pipeline.py::test_no_credential_reaches_logs_artifacts_or_outputs"],
    ),
    (
        "The user's dataset is only read: every bad-input case leaves the source folder's hashes unchanged",
        ["tests/test_ingest_checks.py::test_bad_input_stops_with_one_line_naming_the_file"],
    ),
    (
        "An archive member that inflates far beyond image data (a zip bomb), or archives that would overflow "
        "the disk, are refused with one line before anything is written",
        [
            "tests/test_ingest_checks.py::test_an_archive_member_that_inflates_far_beyond_image_data_is_refused_before_extraction"
        ],
    ),
    (
        "Registry (in order, on one repository): a stale or uncommitted pipeline is refused; the first version "
        "goes to prod; a better model is promoted, a worse one registered but not promoted",
        [
            "tests/test_registry.py::test_a_stale_or_uncommitted_pipeline_is_refused",
            "tests/test_registry.py::test_the_first_version_goes_to_prod",
            "tests/test_registry.py::test_an_unchanged_model_is_not_registered_again",
            "tests/test_registry.py::test_a_better_model_is_promoted",
            "tests/test_registry.py::test_a_worse_model_is_registered_but_not_promoted",
            "tests/test_registry.py::test_predict_by_version_and_by_stage",
            "tests/test_registry.py::test_onnx_and_pytorch_agree",
            "tests/test_registry.py::test_tiled_and_whole_masks_of_a_trained_model_agree",
            "tests/test_registry.py::test_dvc_artifacts_get_fetches_a_version",
        ],
    ),
    (
        "A changed workspace model is refused when loaded as a folder (one line naming `dvc checkout`), and "
        "passed over for DVC's copy when fetched by version; weights swapped in DVC's cache are refused "
        "against the card committed in git with the tag, naming both hashes",
        [
            "tests/test_registry.py::test_a_tampered_workspace_model_is_refused_and_the_registry_falls_back_to_dvcs_copy",
            "tests/test_registry.py::test_weights_swapped_in_dvcs_cache_are_refused_against_the_tags_card",
        ],
    ),
    (
        "The gate compares like with like: with the test split unchanged the champion's own score stands; "
        "after it changed the champion is re-scored on the candidate's split (both scores in the outcome, "
        "card and tag), a worse model is not promoted and a better one is, the re-score cached; "
        "`register.rescore: false` says it compared across splits",
        [
            "tests/test_registry.py::test_an_unchanged_split_keeps_the_champions_own_score",
            "tests/test_registry.py::test_when_the_test_split_grows_the_champion_is_rescored_on_it",
            "tests/test_registry.py::test_a_better_model_on_the_changed_split_is_promoted_though_its_registration_is_killed_twice",
            "tests/test_registry.py::test_rescore_off_compares_with_the_champions_own_split_and_says_so",
        ],
    ),
    (
        "A registration killed (SIGKILL) after its card commit, and again after its version tag, is completed "
        "by the next `segflow register`: every version tag points at a commit holding its card, `gto show` "
        "and `segflow models` agree, one commit per version; uncommitted code is refused unless "
        "`--allow-dirty` (then recorded); the source commit holds the model's dvc.lock",
        [
            "tests/test_registry.py::test_a_better_model_on_the_changed_split_is_promoted_though_its_registration_is_killed_twice"
        ],
    ),
    (
        "Two `segflow register` at once: the second gets one line naming the first",
        ["tests/test_registry.py::test_a_second_register_at_once_gets_one_line"],
    ),
    (
        "One line, not a traceback: `--device cuda` without a GPU, a binary params.yaml or configuration, a "
        "YAML alias bomb (refused before it expands), `train.epochs: 1000000000`",
        [
            "tests/test_infer.py::test_asking_for_cuda_without_a_gpu_is_one_line",
            "tests/test_params.py::test_binary_params_and_configuration_files_are_one_line",
            "tests/test_params.py::test_a_yaml_alias_bomb_is_refused_in_one_line_before_it_expands",
            "tests/test_params.py::test_counts_have_sane_upper_bounds",
        ],
    ),
    (
        "A disk that fills during training (a real tmpfs, filled mid-run) leaves the last good model in place, "
        "byte for byte (as read-only links into DVC's cache when a copy does not fit), dvc.lock unchanged, and "
        "one line naming the disk and what is free on it",
        [
            "tests/test_disk_full.py::test_a_disk_that_fills_during_training_keeps_the_last_good_model",
            "tests/test_disk_full.py::test_restore_on_a_full_disk_links_into_dvc_cache",
            "tests/test_disk_full.py::test_a_full_disk_is_one_line_naming_the_file_and_the_disk",
        ],
    ),
    (
        "Crashes around the Prefect server (in order, one project): the project's server killed mid-training ends "
        "`segflow run` with one line within a minute, the stage stopped and the outputs kept; every process of a "
        "run killed at once (server included) leaks no gpu slot: the next run reclaims it and says whose it was, "
        "marks the dead runs and their task runs CRASHED, and works; `segflow worker` losing its server is one line",
        [
            "tests/test_crash.py::test_a_killed_server_ends_the_run_with_one_line_and_keeps_the_outputs",
            "tests/test_crash.py::test_power_loss_mid_training_then_the_slot_it_leaked_is_reclaimed",
            "tests/test_crash.py::test_the_next_run_marks_the_dead_runs_crashed_reclaims_the_slot_and_works",
            "tests/test_crash.py::test_a_worker_whose_server_goes_away_ends_with_one_line",
        ],
    ),
    (
        "Switching an export on or off reruns only the export stage (train unchanged in `dvc status`); the ONNX "
        "export of a version is fetched through DVC and checked against the tag's card",
        [
            "tests/test_pipeline.py::test_switching_an_export_on_and_off_reruns_only_the_export_stage",
            "tests/test_registry.py::test_onnx_and_pytorch_agree",
        ],
    ),
    (
        "A large PNG predicts in memory bounded by its width (peak RSS of a real subprocess under a budget that "
        "whole-image prediction exceeds), with the class ids whole prediction gives; a file damaged part-way leaves "
        "no mask; an image too large to decode whole is one line",
        [
            "tests/test_infer.py::test_a_large_png_predicts_in_memory_bounded_by_its_width",
            "tests/test_infer.py::test_a_streamed_image_gets_exactly_the_class_ids_predict_gives",
            "tests/test_infer.py::test_a_png_damaged_part_way_leaves_no_mask",
            "tests/test_infer.py::test_an_image_too_large_to_decode_whole_is_one_line_naming_the_fix",
        ],
    ),
    (
        "A changed DVC-tracked dataset is recorded in its .dvc file by `segflow run` (dvc status clean after the "
        "run); DVC lock entries of killed stages are cleared once, quietly, by the next run",
        [
            "tests/test_pipeline_folder.py::test_adding_an_image_reruns_ingest_and_every_later_stage",
            "tests/test_flow.py::test_stale_dvc_lock_entries_of_killed_stages_are_cleared_once_quietly",
        ],
    ),
    (
        "A frozen test set (`segflow freeze-test`) stays exactly itself as the data grows; no earlier image moves",
        ["tests/test_ingest.py::test_a_frozen_test_set_stays_exactly_itself_as_the_data_grows"],
    ),
    (
        "Cancelling a deployment run through the API while `train` runs (the dashboard's Cancel): no stage process "
        "20 s later, the run CANCELLED, the last good model byte-identical",
        ["tests/test_team_cancel.py::test_cancel_from_the_dashboard_stops_the_stage_and_keeps_the_last_good_model"],
    ),
    (
        "A `segflow worker` killed with SIGKILL mid-train: no stage process 20 s later, the run marked CRASHED by "
        "itself (not left RUNNING), the next run resumes from the checkpoint; the leash and the run's watch of its "
        "worker on their own",
        [
            "tests/test_team_cancel.py::test_a_killed_worker_leaves_no_stage_its_run_crashes_and_the_next_run_resumes",
            "tests/test_team_cancel.py::test_a_leash_with_tree_also_stops_what_its_command_started_in_other_sessions",
            "tests/test_team_cancel.py::test_a_flow_run_process_ends_when_its_worker_is_gone",
        ],
    ),
    (
        "A run that finds the project held by another pipeline ends Cancelled (Busy) with one line; `segflow "
        "deploy` creates the heartbeat automation that crashes runs of machines that died whole",
        [
            "tests/test_team_cancel.py::test_a_run_that_finds_the_project_busy_ends_cancelled_with_one_line",
            "tests/test_team_cancel.py::test_deploy_creates_the_automation_that_crashes_silent_runs",
        ],
    ),
    (
        "A SIGKILLed `segflow server` takes Prefect's server with it (port and database freed)",
        ["tests/test_crash.py::test_a_killed_segflow_server_takes_its_prefect_server_with_it"],
    ),
    (
        "The run history on PostgreSQL survives a restart of the server; a bad database is one line",
        ["tests/test_team_postgres.py"],
    ),
]

REPRODUCIBILITY = """\
## What is and is not reproducible

- **Same machine, same software: bit-identical.** Every stage is seeded
  (`seed` in params.yaml; albumentations through `Compose(seed=...)`; data
  loader workers derive theirs from it), weights are written as safetensors
  with one metadata key, and reports hold no times. Two clones running
  `make demo` on one machine leave the same `dvc.lock`
  (`tests/test_ingest.py::test_rerun_is_byte_identical` checks ingest byte
  for byte; the demo's committed `dvc.lock` checks the rest).
- **Another CPU: the same data and splits, slightly different models.**
  Ingest and augment outputs are identical (integer and PNG work). Training
  is not bit-identical across CPU types: PyTorch's CPU kernels (oneDNN / MKL)
  pick code paths by instruction set (AVX2, AVX-512, AMX) and sum in
  different orders, so float rounding differs from the first step and the
  trajectories drift apart. Seen here: the demo's test macro IoU was 0.852 on
  one machine and 0.864 on another (difference 0.012, about 1.4 %), with the
  same code, params and data. Compare runs across machines by their metrics
  (with a tolerance), not by `dvc.lock` hashes.
- **GPU.** With `train.deterministic: true` Lightning sets
  `torch.use_deterministic_algorithms(True)`, turns cuDNN autotuning off and
  sets `CUBLAS_WORKSPACE_CONFIG`, so reruns on the same GPU model, driver,
  CUDA and PyTorch versions are bit-identical, at some speed cost. With the
  default (`false`) cuDNN may pick different kernels per run and results
  vary in the last bits. Different GPU models or mixed-precision settings
  (`bf16-mixed` vs `16-mixed`) change results the way different CPUs do.
"""


def run_tests(ids: list[str], report: Path) -> dict[str, tuple[str, float]]:
    """Run the tests; {node id: (outcome, seconds)} (a parametrised id covers all its cases)."""
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", f"--junitxml={report}", *ids],
        cwd=ROOT,
        check=False,
    )
    results = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        node = f"{case.get('classname').replace('.', '/')}.py::{case.get('name')}"
        failed = case.find("failure") is not None or case.find("error") is not None
        outcome = "skipped" if case.find("skipped") is not None else "FAILED" if failed else "passed"
        results[node] = (outcome, float(case.get("time", 0)))
    return results


def _result(test: str, results: dict) -> str:
    cases = {k: v for k, v in results.items() if k == test or k.startswith((test + "[", test + "::"))}  # a file: all
    if not cases:
        return "not run"
    outcomes = sorted({outcome for outcome, _ in cases.values()})
    seconds = sum(t for _, t in cases.values())
    return f"{'/'.join(outcomes)} ({len(cases)} case{'s' if len(cases) > 1 else ''}, {seconds:.0f} s)"


def _in_file_order(ids: set[str]) -> list[str]:
    """Node ids sorted by file, then by where each test is defined: pytest runs explicit ids in the order
    given, and some files run their tests in sequence on one project (the registry's versions build up)."""

    def position(node: str) -> tuple[str, int, str]:
        path, _, name = node.partition("::")
        lines = (ROOT / path).read_text().splitlines()
        line = next((i for i, text in enumerate(lines) if text.startswith(f"def {name.split('[')[0]}(")), 0)
        return path, line, node

    return sorted(ids, key=position)


def main() -> int:
    tests = _in_file_order({t for _, ids in PROMISES for t in ids})
    results = run_tests(tests, ROOT / "bench" / ".reliability.xml")
    (ROOT / "bench" / ".reliability.xml").unlink(missing_ok=True)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    lines = [
        "# Reliability",
        "",
        "What segflow promises when runs fail, are interrupted or are killed, the test that checks each promise,",
        f"and its last result: `make reliability` ({when}, commit {commit.strip() or '?'}; {machine()}).",
        "All of these tests are also part of `make test`.",
        "",
        "How it works: DVC deletes a stage's outputs before it runs it; a stage that fails or is stopped puts",
        "back the outputs of its last successful run (DVC-cached ones from DVC's cache, by the hashes dvc.lock",
        "holds; git-tracked metrics and curves from a copy kept in `.segflow/last-good/`). Stages check",
        "params.yaml before their heavy imports. `segflow run` starts DVC and its temporary Prefect server on a",
        "leash (`segflow/ops/leash.py`) in their own sessions: they stop when segflow is gone, even after SIGKILL.",
        "",
        "| promise | test | last result |",
        "|---|---|---|",
    ]
    for promise, ids in PROMISES:
        for i, test in enumerate(ids):
            lines.append(f"| {promise if i == 0 else '〃'} | `{test}` | {_result(test, results)} |")
    lines += ["", REPRODUCIBILITY]
    DOC.write_text("\n".join(lines))
    print(f"written to {DOC.relative_to(ROOT)}")
    return 0 if all(outcome != "FAILED" for outcome, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
