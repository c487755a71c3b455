"""The long-text chunk prompt by hand (the release's own sequence is in test_glmtts_fixtures)."""

import pytest

from vocalign.policies.long_text import Turn, chunk_prompt


def test_budget_estimate_pruning_and_layout_by_hand():
    voice = Turn.of([1, 2], [0] * 10)  # 10 codes for 2 text ids
    first = Turn.of([3, 4], [1] * 10)
    # no history yet: the voice prompt alone, however long the chunk
    assert chunk_prompt(voice, [], [9] * 100, max_tokens=5) == chunk_prompt(voice, [], [9], max_tokens=5)
    # kept ratio 20 codes / 4 ids = 5 per id; 2 ids -> 10 expected; 20 + 10 <= 30 keeps the history
    kept = chunk_prompt(voice, [first], [7, 8], max_tokens=30)
    assert kept.text_ids == [1, 2, 3, 4] and kept.codes == [0] * 10 + [1] * 10 and kept.history == [first]
    # 3 ids -> 15 expected; 20 + 15 > 30: the oldest chunk goes, the voice prompt stays
    pruned = chunk_prompt(voice, [first], [7, 8, 9], max_tokens=30)
    assert pruned.text_ids == [1, 2] and pruned.codes == [0] * 10 and pruned.history == []
    with pytest.raises(ValueError, match="max_tokens must be positive"):
        chunk_prompt(voice, [], [1], max_tokens=0)
