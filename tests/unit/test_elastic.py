"""The per-host starter names the rank that caused a failure, not a peer that died of it."""

from types import SimpleNamespace

from dsl.launcher.host.elastic import _exit_code, root_cause


def failure(exitcode, timestamp):
    return SimpleNamespace(exitcode=exitcode, timestamp=timestamp)


def test_a_rank_exit_code_beats_a_peer_aborted_in_the_same_second():
    # What CI saw: rank 1 exits 4, rank 0's gloo aborts (SIGABRT) and the agent stamps both alike.
    assert root_cause({0: failure(-6, 1795324758), 1: failure(4, 1795324758)}) == 1


def test_a_specific_code_beats_exit_1_which_beats_a_signal():
    assert root_cause({0: failure(1, 100), 1: failure(7, 100), 2: failure(-15, 100)}) == 1
    assert root_cause({0: failure(-15, 100), 1: failure(1, 100)}) == 1


def test_a_rank_aborted_at_exit_beats_the_peer_torchrun_stopped():
    # Reproduced under load: rank 1 calls sys.exit(4) and dies by SIGABRT in gloo's destructors,
    # torchrun then SIGTERMs rank 0; both stamped in the same second. Rank 0 was named (exit 143).
    assert root_cause({0: failure(-15, 100), 1: failure(-6, 100)}) == 1
    assert root_cause({0: failure(-15, 100), 1: failure(-9, 100)}) == 1


def test_an_earlier_second_wins_whatever_the_kind():
    assert root_cause({0: failure(4, 101), 1: failure(-11, 100)}) == 1


def test_ties_of_the_same_kind_go_to_the_lowest_rank():
    assert root_cause({3: failure(2, 100), 1: failure(2, 100)}) == 1


def test_exit_codes_follow_the_shell_convention():
    assert _exit_code(-6) == 134 and _exit_code(4) == 4 and _exit_code(0) == 1
