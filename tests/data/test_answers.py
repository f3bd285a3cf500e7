import pytest

from spinlm.data.answers import extract_answer, is_correct, normalize_answer


@pytest.mark.parametrize("reply, expected", [
    ("12 + 7 = 19. The answer is 19.", "19"),
    ("The answer is 1,200.", "1200"),
    ("the ANSWER IS:  42", "42"),
    ("The answer is 2.5. Hope that helps!", "2.5"),
    ("In ascending order: 3, 5, 9. The answer is 3,5,  9.", "3, 5, 9"),
    ("First I thought the answer is 3. Actually the answer is 4.", "4"),
    ("The answer is **7**.\nMore text 99", "7"),
    ("12 + 7 = 9.", "9"),
    ("It is -3 degrees or maybe 1,500 meters", "1500"),
    ("I don't know.", None),
])
def test_extract_answer(reply, expected):
    assert extract_answer(reply) == expected


def test_answer_is_without_text_falls_back_to_last_number():
    assert extract_answer("5 + 5 = 10, so the answer is") == "10"


def test_normalize_answer_case_space_period():
    assert normalize_answer("  Seven Hundred. ") == "seven hundred"


def test_is_correct_compares_extracted_answers():
    assert is_correct("so the answer is 140.", "105 + 35 = 140. The answer is 140.")
    assert not is_correct("105 + 35 = 45.", "105 + 35 = 140. The answer is 140.")
    assert not is_correct("no number here", "The answer is 140.")
