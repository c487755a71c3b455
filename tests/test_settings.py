"""Plugin constructors read as config sections: the same errors for a reward's settings as for a recipe's."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pytest

from vocalign.common.settings import from_dict, settings_class
from vocalign.rewards.base import build_reward

if TYPE_CHECKING:
    from collections import OrderedDict  # a name that does not resolve at run time


class FakeLoudnessPlugin:
    """A test double with one required, one typed and one unresolvable setting."""

    def __init__(self, reference: str, *, target_dbfs: float = -20.0, window: int = 3, label: str | None = None,
                 voice: str = None, table: OrderedDict = None) -> None:
        self.reference, self.target_dbfs, self.window = reference, target_dbfs, window

    def score(self, samples):
        return []


class FakeOpenPlugin:
    """A test double that takes any setting."""

    def __init__(self, **settings) -> None:
        self.settings = settings

    def score(self, samples):
        return []


TARGET = f"{__name__}:FakeLoudnessPlugin"


def test_a_constructor_becomes_a_section_with_its_types_and_defaults():
    cls = settings_class(FakeLoudnessPlugin)
    read = from_dict(cls, {"reference": "a.wav", "target_dbfs": -12, "voice": None,
                              "table": {"any": "thing"}}, "reward 'loud'")
    assert (read.reference, read.target_dbfs, read.window, read.label) == ("a.wav", -12.0, 3, None)
    assert read.table == {"any": "thing"}  # its annotation names a TYPE_CHECKING-only import: any value passes
    assert settings_class(FakeLoudnessPlugin) is cls


@pytest.mark.parametrize(("settings", "message"), [
    ({"reference": "a.wav", "windw": 2}, "unknown key(s) in reward 'loud': 'windw' (did you mean 'window'?)"),
    ({"reference": "a.wav", "window": "3"}, "reward 'loud'.window must be an integer, got '3'"),
    ({"reference": "a.wav", "target_dbfs": "loud"}, "reward 'loud'.target_dbfs must be a number, got 'loud'"),
    ({"reference": 1}, "reward 'loud'.reference must be a string, got 1"),
    ({"window": 2}, "missing required key(s) reward 'loud'.reference"),
])
def test_a_reward_setting_is_checked_before_the_plugin_is_built(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_reward("loud", target=TARGET, **settings)


def test_the_plugin_gets_its_settings_as_read():
    """YAML reads `1e-3` as a string: a float setting reaches the plugin as the float the check read."""
    plugin = build_reward("loud", target=TARGET, reference="a.wav", target_dbfs="-1.2e1")
    assert plugin.target_dbfs == -12.0 and type(plugin.target_dbfs) is float and plugin.window == 3


def test_a_remote_reward_gets_its_client_settings_as_read():
    from vocalign.rewards.client import RemoteReward

    remote = RemoteReward("cer", ["http://127.0.0.1:9"], timeout_s="1e2")
    assert remote.client.timeout_s == 100.0


def test_a_plugin_that_takes_any_setting_gets_them_all():
    plugin = build_reward("open", target=f"{__name__}:FakeOpenPlugin", anything=1)
    assert plugin.settings == {"anything": 1}
