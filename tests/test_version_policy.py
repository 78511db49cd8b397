"""The version policy of `digits serve` (serving/version_policy.py) without TensorFlow or a model: which
versions it loads and unloads, in which order, for what is on disk and what became of earlier loads."""

from __future__ import annotations

from collections.abc import Collection

from serving.version_policy import LOAD, UNLOAD, Action, Versions, next_action, wanted_versions


def _steps(on_disk: Collection[int], loaded: Collection[int] = (), num_versions: int = 1,
           failing: Collection[int] = (), unsettled: Collection[int] = ()) -> list[tuple[str, int]]:
    """The actions the policy takes until it has nothing more to do, as ModelManager.poll applies them:
    a load of a version in `failing` fails (it is then failed as it is on disk), every other one succeeds."""
    versions = Versions.of(on_disk, loaded, unsettled=unsettled)
    taken: list[tuple[str, int]] = []
    while (action := next_action(versions, num_versions)) is not None:
        assert len(taken) < 20, f"the policy does not settle: {taken}"
        taken.append((action.kind, action.version))
        if action.kind == UNLOAD:
            versions = Versions.of(on_disk, versions.loaded - {action.version}, versions.failed, unsettled)
        elif action.version in failing:
            versions = Versions.of(on_disk, versions.loaded, versions.failed | {action.version}, unsettled)
        else:
            versions = Versions.of(on_disk, versions.loaded | {action.version}, versions.failed, unsettled)
    return taken


def test_the_newest_versions_are_wanted_and_loaded_oldest_first():
    assert wanted_versions({5, 1, 3, 4}, 2) == [4, 5]
    assert _steps(on_disk={1, 2, 3}, num_versions=2) == [(LOAD, 2), (LOAD, 3)]  # start-up: 1 is never loaded


def test_a_new_version_is_loaded_before_the_old_one_is_unloaded():
    assert next_action(Versions.of(on_disk={1, 2}, loaded={1}), num_versions=1) == Action(LOAD, 2)
    assert _steps(on_disk={1, 2}, loaded={1}, num_versions=1) == [(LOAD, 2), (UNLOAD, 1)]


def test_a_new_version_joins_the_loaded_ones_while_they_are_fewer_than_num_versions():
    assert _steps(on_disk={1, 2}, loaded={1}, num_versions=2) == [(LOAD, 2)]
    assert _steps(on_disk={1, 2, 3}, loaded={1, 2}, num_versions=2) == [(LOAD, 3), (UNLOAD, 1)]


def test_a_version_still_being_copied_in_waits_and_nothing_is_unloaded_for_it():
    assert _steps(on_disk={1, 2}, loaded={1}, unsettled={2}) == []
    assert _steps(on_disk={1, 2}, loaded={1}) == [(LOAD, 2), (UNLOAD, 1)]  # the next scan, once it settled


def test_a_version_removed_from_disk_is_unloaded():
    assert _steps(on_disk={2}, loaded={1, 2}, num_versions=2) == [(UNLOAD, 1)]


def test_removing_the_newest_version_brings_back_the_previous_one_before_unloading_it():
    # The runbook's rollback: move the bad version's directory out of the base path.
    assert _steps(on_disk={1}, loaded={2}) == [(LOAD, 1), (UNLOAD, 2)]


def test_a_new_version_that_fails_to_load_leaves_the_old_one_serving():
    assert _steps(on_disk={1, 2}, loaded={1}, failing={2}) == [(LOAD, 2)]
    # Failed as it is on disk: not tried again on the next scans, and the old one stays.
    assert next_action(Versions.of(on_disk={1, 2}, loaded={1}, failed={2}), num_versions=1) is None
    # Its directory changed (a new copy): it is tried again.
    assert next_action(Versions.of(on_disk={1, 2}, loaded={1}), num_versions=1) == Action(LOAD, 2)


def test_the_last_loaded_versions_are_never_unloaded_for_wanted_ones_that_do_not_load():
    # Nothing wanted is loaded: both old versions keep serving (TF Serving would unload the older one).
    assert _steps(on_disk={1, 2, 3}, loaded={1, 2}, failing={3}) == [(LOAD, 3)]
    assert _steps(on_disk={1, 2, 3, 4}, loaded={1}, num_versions=2, failing={3, 4}) == [(LOAD, 3), (LOAD, 4)]
    # One wanted version is loaded: the unwanted ones go, even though the newest failed.
    assert _steps(on_disk={1, 2, 3}, loaded={1, 2}, num_versions=2, failing={3}) == [(LOAD, 3), (UNLOAD, 1)]


def test_an_emptied_base_path_unloads_nothing_and_an_empty_one_loads_nothing():
    assert next_action(Versions.of(on_disk=set(), loaded={1, 2}), num_versions=2) is None
    assert next_action(Versions.of(on_disk=set()), num_versions=1) is None


def test_num_versions_at_least_the_versions_on_disk_keeps_them_all():
    # What TF Serving's `all {}` policy does, with `latest { num_versions }` larger than the versions on disk.
    assert _steps(on_disk={1, 2, 3}, num_versions=5) == [(LOAD, 1), (LOAD, 2), (LOAD, 3)]
    assert _steps(on_disk={1, 2, 3, 4}, loaded={1, 2, 3}, num_versions=5) == [(LOAD, 4)]
