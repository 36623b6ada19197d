"""Synthetic spelling tasks built per index from an English word list (nanochat's tasks/spellingbee.py):
SpellingBee, "how many r are in strawberry?" (spell, tally, confirm with one python call, '#### 3'), and
SimpleSpelling, "Spell the word: apple" -> "apple:a,p,p,l,e". Sampling as in nanochat, with our own templates and
wording. Example i uses seed i for train and 10,000,000 + i for test (not -(i+1): Random(-n) equals Random(n)).
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

from nanochat_jax.tasks.common import Task, extract_hash_answer, fetch_file, require_one_of, task_data_dir

LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORD_LIST_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
TEST_RANDOM_SEED_OFFSET = 10_000_000  # more than the number of words: test seeds never meet train seeds

# No trailing punctuation: the '?' is added (or not) at random afterwards.
USER_MSG_TEMPLATES = (
    # English (30)
    "What number of times does the letter {letter} show up in {word}",
    "If you look at {word}, how often do you see {letter}",
    "Please tally the {letter} characters in {word}",
    "I need to know how many {letter} the word {word} contains",
    "Quick question: how many {letter} can be found in {word}",
    "Could you tell me how often {letter} occurs in {word}",
    "Spell {word} and count its {letter}",
    "Looking at the word {word}, what is the tally of {letter}",
    "Every {letter} in {word} counts as one; what is the total",
    "How frequently does {letter} turn up in {word}",
    "Within {word}, how many copies of {letter} are there",
    "Run a letter count on {word}, looking only for {letter}",
    "Report how many times {word} uses the letter {letter}",
    "{letter} appears in {word} how many times",
    "Check {word} for the letter {letter} and say how many there are",
    "What's the {letter} count for {word}",
    "How often is {letter} used when spelling {word}",
    "Go through {word} and count each {letter}",
    "Letter {letter}, word {word}: how many",
    "Would you count the occurrences of {letter} in {word} for me",
    "When you spell out {word}, how many {letter} do you get",
    "Determine how many {letter} characters {word} has",
    "I'm curious how many {letter} are hiding in {word}",
    "Scan {word} and tell me the number of {letter}",
    "How many of the letters in {word} are {letter}",
    "Figure out how many times {letter} occurs within {word}",
    "Among the letters of {word}, how many are {letter}",
    "Give the number of {letter} characters in the word {word}",
    "Help me out: what is the total of {letter} letters across {word}",
    "Can you work out how many {letter} there are in {word}",
    # Spanish (4)
    "Dime el total de letras {letter} que lleva la palabra {word}",
    "Necesito saber cuántas {letter} contiene la palabra {word}",
    "En la palabra {word}, cuenta cuántas veces está la {letter}",
    "Cuál es el número de letras {letter} en {word}",
    # Chinese, simplified (4)
    "请数一数：字母{letter}在{word}里出现了几回",
    "{letter}这个字母在{word}中出现了几次",
    "帮我统计{word}中字母{letter}的数量",
    "在{word}这个单词的拼写中，字母{letter}出现了多少回",
    # Korean (4)
    "{word}라는 단어 안에 {letter} 글자가 모두 몇 개인지 알려 주세요",
    "{word}에 들어 있는 {letter}의 수를 세어 주세요",
    "{letter} 글자가 {word}에 몇 번 등장하나요",
    "단어 {word}의 철자 중 {letter}는 몇 개입니까",
    # French (3)
    "Peux-tu me dire combien de fois la lettre {letter} figure dans {word}",
    "Quel est le nombre de {letter} dans le mot {word}",
    "Dans le mot {word}, compte les lettres {letter}",
    # German (3)
    "Wie häufig steht der Buchstabe {letter} im Wort {word}",
    "Kannst du mir sagen, wie viele {letter} das Wort {word} enthält",
    "Zähl bitte, wie oft {letter} in {word} auftaucht",
    # Japanese (3)
    "単語{word}の中に文字{letter}はいくつ含まれていますか",
    "{word}という単語で{letter}が出てくる回数を教えてください",
    "{word}の{letter}を数えてください",
)
_QUOTES = ("", "'", '"')
TALLY_MARK = " <- match, tally "  # follows "position:letter" on the lines where the letter matches


def word_list_path(data_dir=None) -> Path:
    local = task_data_dir(data_dir)
    if local is not None and (local / "english_words" / "words_alpha.txt").is_file():
        return local / "english_words" / "words_alpha.txt"
    return fetch_file(WORD_LIST_URL, "words_alpha.txt")


@functools.lru_cache(maxsize=4)
def _load_words(path: str, shuffle_seed: int | None) -> tuple[str, ...]:
    with open(path, encoding="utf-8") as f:
        words = f.read().split()  # one word a line; split() also drops the local copy's CRLF ends
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(words)
    return tuple(words)


def _question(rng: random.Random, word: str, letter: str) -> str:
    """A random template, lowercased 30% of the time, each slot maybe quoted, with a '?' half of the time."""
    template = rng.choice(USER_MSG_TEMPLATES)
    template = template.lower() if rng.random() < 0.3 else template
    q_letter, q_word = rng.choice(_QUOTES), rng.choice(_QUOTES)
    text = template.format(letter=q_letter + letter + q_letter, word=q_word + word + q_word)
    return (text + "?") if rng.random() < 0.5 else text


def reply_parts(word: str, letter: str) -> list[dict]:
    """The assistant's answer: spell, tally by hand, confirm with one python call, then '#### n'. Tally lines are
    "position:letter" with no space, so each letter is the same token as in the spelled-out "word:w,o,r,d"."""
    count = word.count(letter)
    lines, tally = [], 0
    for pos, char in enumerate(word, 1):
        tally += char == letter
        lines.append(f"{pos}:{char}" + (f"{TALLY_MARK}{tally}" if char == letter else ""))
    by_hand = (f"The question is how often '{letter}' occurs in '{word}'. I'll go through it one letter at a "
               f"time.\n\nSpelled out:\n{word}:{','.join(word)}\n\n"
               f"Walking through the letters and keeping a tally of '{letter}':\n" + "\n".join(lines) +
               f"\n\nMy tally by hand comes to {tally}.")
    return [
        {"type": "text", "text": by_hand},
        {"type": "text", "text": "\n\nTo be sure, I'll verify that with a quick Python call:\n\n"},
        {"type": "python", "text": f"'{word}'.count('{letter}')"},
        {"type": "python_output", "text": str(count)},
        {"type": "text", "text": f"\n\nThe tool returns {count}, the same as my tally.\n\nAnswer:\n\n#### {count}"},
    ]


class _WordTask(Task):
    """Generative, `size` examples drawn from the word list (shuffled with Random(shuffle_seed) when set)."""

    kind = "generative"
    shuffle_seed: int | None = None

    def __init__(self, size: int = 1000, split: str = "train", data_dir=None, **kwargs):
        super().__init__(**kwargs)
        require_one_of("split", split, ("train", "test"))
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.size, self.split = size, split
        self.words = _load_words(str(word_list_path(data_dir)), self.shuffle_seed)

    def num_examples(self) -> int:
        return self.size

    def rng(self, index: int) -> random.Random:
        return random.Random(index if self.split == "train" else TEST_RANDOM_SEED_OFFSET + index)


class SpellingBee(_WordTask):
    """Count a letter in a word; graded by the '#### n' answer like GSM8K."""

    def get_example(self, index: int) -> dict:
        rng = self.rng(index)
        word = rng.choice(self.words)
        # Usually a letter the word has; one time in ten any letter, so that 0 is a possible answer.
        letter = rng.choice(word if rng.random() < 0.9 else LETTERS)
        return {"messages": [{"role": "user", "content": _question(rng, word, letter)},
                             {"role": "assistant", "content": reply_parts(word, letter)}]}

    def evaluate(self, conversation: dict, completion: str) -> int:
        reference = extract_hash_answer(conversation["messages"][-1]["content"][-1]["text"])
        return int(reference == extract_hash_answer(completion))


class SimpleSpelling(_WordTask):
    """Spell a word: "Spell the word: w" -> "w:w,o,r,d" (words in a Random(42) shuffled order, unlike SpellingBee)."""

    shuffle_seed = 42

    def get_example(self, index: int) -> dict:
        word = self.rng(index).choice(self.words)
        spelled = word + ":" + ",".join(word)
        return {"messages": [{"role": "user", "content": "Spell the word: " + word},
                             {"role": "assistant", "content": spelled}]}

    def evaluate(self, conversation: dict, completion: str) -> int:
        """1 if the completion is exactly the reference spelling (surrounding whitespace ignored)."""
        return int(completion.strip() == conversation["messages"][-1]["content"])
