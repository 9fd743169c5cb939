"""The pieces of bench/lm_eval_run.py that need no server: lm-eval's context/continuation split,
agreement, the exit share and the report (the run itself: tests/e2e/test_lm_eval.py)."""
from bench.lm_eval_run import agreement, encode_pair, format_report, share_exited_early


def test_encode_pair_moves_trailing_spaces_to_the_continuation():
    encode = lambda text: [ord(c) for c in text]  # one token per character
    context, continuation = encode_pair(encode, "the cat  ", "sat")
    assert context == encode("the cat") and continuation == encode("  sat")


def test_agreement_and_exit_share():
    full = [{"filtered_resps": ["Paris"]}, {"filtered_resps": ["4"]}]
    early = [{"filtered_resps": ["Paris"]}, {"filtered_resps": ["5"]}]
    assert agreement(full, early) == 0.5
    assert share_exited_early({25: 2.0, 30: 8.0}, {25: 5.0, 30: 17.0}, num_layers=30) == 0.25
    assert share_exited_early({30: 8.0}, {30: 8.0}, num_layers=30) is None


def test_report_names_every_run():
    report = {"model": "m", "full_depth": {"results": {"offramp_cloze": {"acc,none": 0.5, "acc_norm,none": 0.75},
                                                       "offramp_qa": {"exact_match,none": 0.25}}},
              "loglikelihood_check": {"requests": 8, "max_abs_diff": 1e-4, "mean_abs_diff": 5e-5,
                                      "max_abs_diff_per_token": 1e-5, "tolerance_per_token": 1e-4,
                                      "within_tolerance": True, "is_greedy_agrees": 1.0},
              "early_exit": {"0.9": {"exact_match": 0.25, "agreement_with_full_depth": 1.0,
                                     "tokens_exited_early": 0.1}}}
    text = format_report(report)
    assert "acc 0.500, acc_norm 0.750" in text and "within" in text
    assert "| early exit, eps 0.9 | 0.250 | 1.000 | 10.0% |" in text
