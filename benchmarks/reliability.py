"""The README's Reliability table: every fault curate is tested against, run now, with its result.

    python benchmarks/reliability.py            # runs the fault tests, prints the table
    python benchmarks/reliability.py --readme   # ... and writes it into README.md between the markers

Each row is one attack or fault (issue 13's findings) and the tests that reproduce it against real components
(SIGKILL, SIGSTOP, a stopped S3 server, bit flips, hostile pickles, concurrent processes). The script runs those
tests with pytest, reads pytest's JUnit report and fills in the result and the time each row took; a row whose
tests do not all pass says FAIL. Results also go to benchmarks/results/reliability.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- reliability:start -->", "<!-- reliability:end -->"

# (what was tried, what curate does, the tests: pytest node ids, a trailing "*" matching a parametrized family)
ROWS: list[tuple[str, str, list[str]]] = [
    ("`curate run --resume` on a planted pickle that runs code when unpickled",
     "refused (`weights_only=True`), the payload never runs",
     ["tests/test_cli.py::test_resume_refuses_a_checkpoint_that_would_run_code"]),
    ("`kill -9` of `curate precompute` at 5 seeded random moments, then rerun",
     "cache bitwise equal to an uninterrupted run's; no temp or claim files left",
     ["tests/test_kill.py::test_precompute_killed_five_times_then_rerun_equals_an_uninterrupted_run"]),
    ("`kill -9` of `curate run` at 5 seeded random moments, each followed by `--resume`",
     "weights and metrics bitwise equal to an uninterrupted run's; no temp files left",
     ["tests/test_kill.py::test_run_killed_five_times_then_resumed_equals_an_uninterrupted_run"]),
    ("resume from every position, incl. an epoch's last batch and its StopIteration: StatefulDataLoader "
     "(0 / 2 workers), HF `IterableDataset`, torchdata's own save/load cases on every stage",
     "the exact stream; the epoch count never shifts",
     ["tests/test_resume.py::test_stateful_dataloader_source_resumes_exactly_at_every_point*",
      "tests/test_resume.py::test_hf_iterable_dataset_source_resumes_exactly",
      "tests/test_resume.py::test_torchdata_save_load_state_cases_on_every_stage*"]),
    ("`set_epoch(e)` (open_clip's resume) and sources with their own `set_epoch`",
     "epoch e's randomness in every stage and the source",
     ["tests/test_resume.py::test_set_epoch_draws_that_epochs_randomness*",
      "tests/test_resume.py::test_set_epoch_after_load_state_dict",
      "tests/test_resume.py::test_hf_iterable_dataset_gets_curates_epoch"]),
    ("a cache of a retrained reference, of other data with the same keys, with mixed parts; a SigLIP cache "
     "for a softmax scorer",
     "refused naming both values; precompute rescores only the stale parts",
     ["tests/test_cache_faults.py::test_a_cache_of_another_reference_or_dataset_is_refused_naming_both",
      "tests/test_cache_faults.py::test_a_retrained_reference_is_refused_by_the_run_and_rescored_by_precompute",
      "tests/test_cache_faults.py::test_a_cache_of_other_data_with_the_same_keys_is_refused",
      "tests/test_cache_faults.py::test_mixed_parts_are_refused_and_precompute_rescores_only_the_odd_ones",
      "tests/test_cache_faults.py::test_a_siglip_cache_is_refused_by_a_softmax_scorer"]),
    ("single-bit flips at 40 seeded positions of a part (fp32 and fp16); a part without its checksum",
     "refused by name (sha256 per part), or nothing read changed; `--overwrite` mends it",
     ["tests/test_cache_faults.py::test_single_bit_flips_are_refused_or_change_nothing_read*",
      "tests/test_cache_faults.py::test_a_part_without_its_checksum_or_with_a_wrong_one_is_refused",
      "tests/test_cache_faults.py::test_overwrite_rescores_every_part_and_mends_a_damaged_one"]),
    ("two `curate precompute` processes on one cache; a live, a dead, a stale and a half-created claim (local and S3)",
     "every shard scored once, the cache equals one process's; a live writer's temp is never deleted; a claim is "
     "never seen half-written",
     ["tests/test_cache_faults.py::test_two_concurrent_precomputes_score_every_shard_once",
      "tests/test_cache_faults.py::test_what_a_writer_killed_while_claiming_leaves_is_taken_over_and_removed",
      "tests/test_cache_faults.py::test_local_claims_are_never_seen_half_written",
      "tests/test_cache_faults.py::test_a_live_claim_and_its_temp_file_are_left_alone_and_a_dead_ones_taken_over",
      "tests/test_cache_faults.py::test_a_claim_not_refreshed_for_the_timeout_is_taken_over",
      "tests/test_cache_faults.py::test_claims_on_s3_are_exclusive_and_a_stale_one_is_taken_over_once",
      "tests/test_cache_faults.py::test_a_working_owner_keeps_its_claim_fresh*"]),
    ("a rank SIGSTOPped under real `torchrun` (the library, and `curate run`)",
     "every other rank exits within the timeout + a few seconds, naming the stalled rank",
     ["tests/test_liveness.py::test_a_stopped_rank_ends_the_pipeline_within_its_timeout_naming_the_group",
      "tests/test_liveness.py::test_a_stopped_rank_of_curate_run_ends_every_other_rank_within_the_recipes_timeout"]),
    ("the S3 server process SIGSTOPped mid-job (a part's write, reads, shard lists and shards, a Polars scan); "
     "an unreachable endpoint through the CLI",
     "a named error within 90 s (limits configurable); one line, rc 2",
     ["tests/test_liveness.py::test_a_stalled_s3_endpoint_fails_a_write_and_a_read_within_90_s_naming_the_endpoint",
      "tests/test_liveness.py::test_s3_timeouts_are_configurable_through_storage_options",
      "tests/test_liveness.py::test_a_stalled_s3_endpoint_fails_a_polars_scan_of_a_cache_within_90_s",
      "tests/test_cli_faults.py::test_an_unreachable_s3_endpoint_is_one_line_naming_it"]),
    ("`curate run --resume` under a changed recipe",
     "refused naming each changed key (old → new) unless `--resume-anyway`",
     ["tests/test_cli_faults.py::test_resume_under_a_changed_recipe_is_refused_naming_the_keys_unless_asked"]),
    ("a full disk (64 KB tmpfs) and a file-size limit while checkpointing; bad YAML in `--set`; "
     "output paths climbing out of the working directory",
     "one line naming the problem and the fix, rc 2, no temp files left",
     ["tests/test_cli_faults.py::test_a_full_disk_fails_the_checkpoint_cleanly",
      "tests/test_cli_faults.py::test_a_file_size_limit_fails_the_checkpoint_cleanly",
      "tests/test_cli_faults.py::test_bad_yaml_in_set_is_one_line_naming_the_override",
      "tests/test_cli_faults.py::test_relative_output_paths_must_stay_in_the_working_directory*"]),
    ("duplicate or non-string `__key__`s; a one-shot generator as a source",
     "named errors (a cached score is never given to another sample); other sources are never refused",
     ["tests/test_cache_faults.py::test_duplicate_keys_in_a_superbatch_are_refused_naming_them",
      "tests/test_cache_faults.py::test_keys_that_are_not_strings_are_refused",
      "tests/test_resume.py::test_integer_keys_are_refused",
      "tests/test_resume.py::test_a_one_shot_iterator_is_refused_at_its_second_epoch*",
      "tests/test_resume.py::test_re_iterable_sources_are_never_refused"]),
    ("target −100, out-of-range or float class indices, soft labels that are not distributions",
     "`TargetError` naming the samples (−100 would score 0, as if learnt)",
     ["tests/test_scorers.py::test_classification_refuses_targets_it_would_score_wrongly*",
      "tests/test_score.py::test_ignore_index_and_out_of_range_targets_stop_the_pipeline_naming_the_samples"]),
    ("two spawned workers refreshing `WeightSync(shared=True)` while the owner pushes; a dead lock holder",
     "only whole versions are ever read (a cross-process lock orders the copies on any CPU); a named timeout",
     ["tests/test_sync.py::test_spawned_readers_only_ever_see_whole_versions",
      "tests/test_sync.py::test_a_pickled_shared_sync_takes_the_same_lock_and_a_dead_holder_times_out"]),
]


def node_ids() -> list[str]:
    return [node for _, _, nodes in ROWS for node in nodes]


def run_tests(nodes: list[str]) -> dict[str, tuple[str, float]]:
    """pytest over the tests the rows name; {test id: (outcome, seconds)} from its JUnit report."""
    ids = list(dict.fromkeys(node.rstrip("*") for node in nodes))  # a test's id runs all its parametrizations
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                        *ids], cwd=ROOT, check=False)
        tree = ET.parse(report)
    results = {}
    for case in tree.iter("testcase"):
        module = case.get("classname", "").replace(".", "/") + ".py"
        outcome = "pass"
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "FAIL"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        results[f"{module}::{case.get('name')}"] = (outcome, float(case.get("time", 0)))
    return results


def _matching(node: str, results: dict) -> list[str]:
    if node.endswith("*"):
        return [name for name in results if name.startswith(node[:-1])]
    return [node] if node in results else []


def table(results: dict[str, tuple[str, float]]) -> tuple[str, list[dict]]:
    lines = ["| what was tried | what curate does | result | tests |", "|---|---|---|---|"]
    rows = []
    for tried, does, nodes in ROWS:
        names = [name for node in nodes for name in _matching(node, results)]
        outcomes = [results[name][0] for name in names]
        result = ("pass" if names and all(o == "pass" for o in outcomes) else
                  "FAIL" if "FAIL" in outcomes or not names else "skipped")
        seconds = sum(results[name][1] for name in names)
        functions = dict.fromkeys(name.split("::")[1].split("[")[0] for name in names)  # parametrized: once
        tests = ", ".join(f"`{function}`" for function in functions) or "missing"
        cases = f"{len(names)} case" + "s" * (len(names) != 1)
        lines.append(f"| {tried} | {does} | {result} ({cases}, {seconds:.0f} s) | {tests} |")
        rows.append({"tried": tried, "does": does, "result": result, "tests": names, "seconds": round(seconds, 1)})
    return "\n".join(lines), rows


def write_readme(text: str) -> None:
    readme = ROOT / "README.md"
    old = readme.read_text()
    if START not in old or END not in old:
        raise SystemExit(f"README.md has no {START} ... {END} markers to write the table between")
    stamp = time.strftime("%Y-%m-%d")
    block = f"{START}\n_Run {stamp} by `python benchmarks/reliability.py --readme`._\n\n{text}\n{END}"
    readme.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, old, flags=re.S))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = parser.parse_args(argv)
    results = run_tests(node_ids())
    text, rows = table(results)
    print(text)
    out = ROOT / "benchmarks" / "results" / "reliability.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1) + "\n")
    if args.readme:
        write_readme(text)
    return 0 if all(row["result"] == "pass" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
