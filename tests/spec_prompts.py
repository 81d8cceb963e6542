"""Prompt suite for lossless speculative decoding (issue 3): data plus tiny accessors.

Each prompt is a dict:
    {"id": "code-01",
     "category": "code_edit" | "summary" | "doc_qa" | "multi_turn" | "story",
     "messages": [OpenAI-style chat messages, the last one a user turn],
     "references": [documents a copy drafter may use; each is quoted verbatim in the messages]}
doc_qa prompts also carry "answer": a span of the document that answers the question.

Sources: the code snippets, conversations, prose passages and story openings are written for this
suite; the other summary and all doc_qa documents are Python's own pydoc topics
(`pydoc_data.topics`, shipped with every CPython), loaded at import time by key, so nothing here
needs the network.
Every rendered prompt stays under PROMPT_TOKEN_LIMIT tokens of SmolLM2's tokenizer
(tests/test_spec_prompts.py checks it).
"""

from __future__ import annotations

import pydoc_data.topics as _pydoc

CATEGORIES = ("code_edit", "summary", "doc_qa", "multi_turn", "story")
GROUNDED = ("code_edit", "summary", "doc_qa", "multi_turn")
PROMPT_TOKEN_LIMIT = 1200
SUMMARY_MAX_WORDS = 400


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _fence(code: str) -> str:
    return "```python\n" + code.strip("\n") + "\n```"


# --- code_edit: (instruction, code). The model is asked to return the whole edited code. ------------

_CODE = [
    ("Rename the variable `total` to `running_sum` everywhere in this function.",
     '''
def moving_average(values, window):
    """Return the averages of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    if window > len(values):
        return []
    averages = []
    total = sum(values[:window])
    averages.append(total / window)
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        averages.append(total / window)
    return averages


def main():
    readings = [3.0, 4.5, 5.0, 6.5, 7.0, 6.0, 5.5]
    for avg in moving_average(readings, 3):
        print(f"{avg:.2f}")


if __name__ == "__main__":
    main()
'''),
    ("Add type hints to every function signature in this module. Do not change anything else.",
     '''
import json
import os


def load_config(path, defaults=None):
    config = dict(defaults or {})
    if not os.path.exists(path):
        return config
    with open(path, encoding="utf-8") as f:
        config.update(json.load(f))
    return config


def save_config(path, config):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def get_option(config, key, default=None):
    value = config.get(key, default)
    if isinstance(value, str):
        value = value.strip()
    return value


def merge_configs(base, override):
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_configs(merged[key], value)
        else:
            merged[key] = value
    return merged
'''),
    ("Add a Google-style docstring (with Args and Returns) to the function `parse_duration`. "
     "Return the full code.",
     '''
import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\\d+(?:\\.\\d+)?)(ms|s|m|h|d)")


def parse_duration(text):
    text = text.strip().lower().replace(" ", "")
    if not text:
        raise ValueError("empty duration")
    seconds = 0.0
    pos = 0
    for match in _PART.finditer(text):
        if match.start() != pos:
            raise ValueError(f"bad duration: {text!r}")
        amount, unit = match.groups()
        seconds += float(amount) * _UNITS[unit]
        pos = match.end()
    if pos != len(text):
        raise ValueError(f"bad duration: {text!r}")
    return seconds


def format_duration(seconds):
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
'''),
    ("Change the constant MAX_RETRIES from 3 to 5 and BACKOFF_SECONDS from 0.5 to 1.0. "
     "Return the complete file.",
     '''
import time
import urllib.error
import urllib.request

MAX_RETRIES = 3
BACKOFF_SECONDS = 0.5
TIMEOUT_SECONDS = 10


class FetchError(Exception):
    """Raised when a URL cannot be fetched after all retries."""


def fetch(url):
    last_error = None
    for attempt in range(MAX_RETRIES):
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
                return response.read()
        except urllib.error.URLError as e:
            last_error = e
            time.sleep(BACKOFF_SECONDS * (2 ** attempt))
    raise FetchError(f"could not fetch {url}: {last_error}")


def fetch_text(url, encoding="utf-8"):
    return fetch(url).decode(encoding, errors="replace")


def fetch_many(urls):
    results = {}
    for url in urls:
        try:
            results[url] = fetch(url)
        except FetchError as e:
            results[url] = e
    return results
'''),
    ("Rename the class `Stack` to `LifoStack` and update every use of it. Return the full code.",
     '''
class Stack:
    """A last-in, first-out container backed by a list."""

    def __init__(self, items=None):
        self._items = list(items or [])

    def push(self, item):
        self._items.append(item)

    def pop(self):
        if not self._items:
            raise IndexError("pop from empty Stack")
        return self._items.pop()

    def peek(self):
        if not self._items:
            raise IndexError("peek at empty Stack")
        return self._items[-1]

    def __len__(self):
        return len(self._items)

    def __repr__(self):
        return f"Stack({self._items!r})"


def balanced(text, pairs={")": "(", "]": "[", "}": "{"}):
    stack = Stack()
    for ch in text:
        if ch in pairs.values():
            stack.push(ch)
        elif ch in pairs:
            if not len(stack) or stack.pop() != pairs[ch]:
                return False
    return not len(stack)
'''),
    ("Convert every string formatting in this code that uses `%` or `.format()` to an f-string. "
     "Return the full code.",
     '''
def describe_file(name, size, modified):
    if size < 1024:
        size_text = "%d bytes" % size
    elif size < 1024 * 1024:
        size_text = "%.1f KiB" % (size / 1024)
    else:
        size_text = "{:.1f} MiB".format(size / (1024 * 1024))
    return "{} ({}), modified {}".format(name, size_text, modified)


def report(files):
    lines = []
    total = 0
    for name, size, modified in files:
        lines.append(describe_file(name, size, modified))
        total += size
    lines.append("%d files, %d bytes in total" % (len(files), total))
    return "\\n".join(lines)


if __name__ == "__main__":
    sample = [
        ("notes.txt", 812, "2024-03-01"),
        ("photo.jpg", 2_400_000, "2024-02-11"),
        ("data.csv", 48_300, "2024-01-30"),
    ]
    print(report(sample))
'''),
    ("Add a parameter `reverse=False` to `top_words` that is passed on to `sorted`. "
     "Return the full code with nothing else changed.",
     '''
import re
from collections import Counter

WORD = re.compile(r"[a-z']+")
STOP_WORDS = frozenset({"the", "a", "an", "and", "or", "of", "to", "in", "is", "it"})


def words(text):
    return [w for w in WORD.findall(text.lower()) if w not in STOP_WORDS]


def top_words(text, n=10):
    counts = Counter(words(text))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ranked[:n]


def print_table(rows):
    width = max((len(word) for word, _ in rows), default=0)
    for word, count in rows:
        print(f"{word:<{width}}  {count:>5}")


if __name__ == "__main__":
    import sys

    print_table(top_words(sys.stdin.read()))
'''),
    ("Rename the parameter `lst` to `items` in both functions. Return the full code.",
     '''
def chunked(lst, size):
    """Split lst into consecutive chunks of at most `size` elements."""
    if size < 1:
        raise ValueError("size must be at least 1")
    chunks = []
    for start in range(0, len(lst), size):
        chunks.append(lst[start:start + size])
    return chunks


def flatten(lst):
    """Flatten one level of nesting: [[1, 2], [3]] -> [1, 2, 3]."""
    flat = []
    for element in lst:
        if isinstance(element, (list, tuple)):
            flat.extend(element)
        else:
            flat.append(element)
    return flat


def interleave(*lists):
    result = []
    longest = max((len(x) for x in lists), default=0)
    for i in range(longest):
        for x in lists:
            if i < len(x):
                result.append(x[i])
    return result
'''),
    ("Replace the print calls with calls to a module-level logger "
     "(`logger = logging.getLogger(__name__)`, info level). Return the full code.",
     '''
import shutil
from pathlib import Path


def backup(source, target_dir, keep=5):
    source = Path(source)
    target_dir = Path(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(target_dir.glob(source.name + ".*.bak"))
    index = len(existing) + 1
    target = target_dir / f"{source.name}.{index:04d}.bak"
    shutil.copy2(source, target)
    print(f"copied {source} to {target}")
    for old in existing[: max(0, len(existing) + 1 - keep)]:
        old.unlink()
        print(f"removed old backup {old}")
    return target


def restore(backup_file, destination):
    backup_file = Path(backup_file)
    if not backup_file.exists():
        raise FileNotFoundError(backup_file)
    shutil.copy2(backup_file, destination)
    print(f"restored {destination} from {backup_file}")
'''),
    ("Add type hints to the dataclass fields and to both methods. Return the full code.",
     '''
from dataclasses import dataclass, field


@dataclass
class Invoice:
    number = ""
    customer = ""
    lines = field(default_factory=list)
    tax_rate = 0.2

    def add_line(self, description, quantity, unit_price):
        if quantity <= 0:
            raise ValueError("quantity must be positive")
        self.lines.append((description, quantity, unit_price))

    def total(self):
        net = sum(quantity * price for _, quantity, price in self.lines)
        return round(net * (1 + self.tax_rate), 2)


def example():
    invoice = Invoice(number="2024-017", customer="Harbour Books")
    invoice.add_line("Shelving unit", 2, 149.0)
    invoice.add_line("Delivery", 1, 35.0)
    return invoice.total()
'''),
    ("Change the default `retries` argument of `connect` from 2 to 4 and rename the helper "
     "`_sleep_time` to `_delay_for`. Return the full code.",
     '''
import random
import socket
import time


def _sleep_time(attempt, base=0.2, cap=5.0):
    delay = min(cap, base * (2 ** attempt))
    return delay * (0.5 + random.random() / 2)


def connect(host, port, retries=2, timeout=3.0):
    last_error = None
    for attempt in range(retries + 1):
        try:
            return socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            last_error = e
            if attempt < retries:
                time.sleep(_sleep_time(attempt))
    raise ConnectionError(f"{host}:{port} unreachable after {retries + 1} tries: {last_error}")


def is_open(host, port):
    try:
        connect(host, port, retries=0).close()
        return True
    except ConnectionError:
        return False
'''),
    ("Rewrite the `for` loop in `even_squares` as a list comprehension and leave the rest of "
     "the code exactly as it is. Return the full code.",
     '''
def even_squares(numbers):
    result = []
    for n in numbers:
        if n % 2 == 0:
            result.append(n * n)
    return result


def odd_cubes(numbers):
    return [n ** 3 for n in numbers if n % 2 == 1]


def summarize(numbers):
    squares = even_squares(numbers)
    cubes = odd_cubes(numbers)
    return {
        "count": len(numbers),
        "even_squares": squares,
        "odd_cubes": cubes,
        "sum_squares": sum(squares),
        "sum_cubes": sum(cubes),
    }


if __name__ == "__main__":
    print(summarize(list(range(1, 11))))
'''),
    ("Add a docstring to the class `LRUCache` and to each of its methods. Return the full code.",
     '''
from collections import OrderedDict


class LRUCache:
    def __init__(self, capacity=128):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._data = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key, default=None):
        if key in self._data:
            self._data.move_to_end(key)
            self.hits += 1
            return self._data[key]
        self.misses += 1
        return default

    def put(self, key, value):
        self._data[key] = value
        self._data.move_to_end(key)
        if len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def __len__(self):
        return len(self._data)
'''),
    ("Change the temperature thresholds: COLD_BELOW becomes 5 and HOT_ABOVE becomes 28. "
     "Also rename `label` to `classify`. Return the full code.",
     '''
COLD_BELOW = 10
HOT_ABOVE = 25


def celsius_to_fahrenheit(c):
    return c * 9 / 5 + 32


def fahrenheit_to_celsius(f):
    return (f - 32) * 5 / 9


def label(celsius):
    if celsius < COLD_BELOW:
        return "cold"
    if celsius > HOT_ABOVE:
        return "hot"
    return "mild"


def weekly_report(readings):
    lines = []
    for day, celsius in readings:
        fahrenheit = celsius_to_fahrenheit(celsius)
        lines.append(f"{day}: {celsius:.1f} C / {fahrenheit:.1f} F ({label(celsius)})")
    return "\\n".join(lines)


if __name__ == "__main__":
    week = [("Mon", 8.5), ("Tue", 12.0), ("Wed", 26.5), ("Thu", 19.0), ("Fri", 4.0)]
    print(weekly_report(week))
'''),
]


def _code_prompts() -> list[dict]:
    out = []
    for i, (instruction, code) in enumerate(_CODE, 1):
        code = code.strip("\n") + "\n"
        text = f"{instruction}\n\n{_fence(code)}"
        out.append({"id": f"code-{i:02d}", "category": "code_edit", "messages": _user(text), "references": [code]})
    return out


# --- summary: pydoc topics cut at paragraph boundaries to <= SUMMARY_MAX_WORDS words, then prose --
# passages written for this suite. Most pydoc topics are grammar-heavy and SmolLM2-135M loops on
# them (4-gram copy rate 0.0-0.35, self-repetition up to 0.8), while it quotes prose passages, so
# prose dominates: four topics are kept as the harder case.

_SUMMARY_TOPICS = ["context-managers", "exceptions", "in", "class"]

_ORIGINAL_PASSAGES = [
    # A town council report.
    "The town council of Wrenfield met on Tuesday evening to discuss the future of the old railway "
    "station. The building has stood empty since the line closed in 1998, and the roof was damaged in "
    "last winter's storms. Councillor Maria Okafor proposed turning the station into a public library "
    "and community hall. \"The station belongs to everyone in Wrenfield, and it should be used by "
    "everyone,\" she said. The plan would cost an estimated 1.2 million pounds, of which 400,000 pounds "
    "would come from a national heritage grant. Councillor Peter Lindqvist argued that the money would "
    "be better spent on repairing roads. He pointed out that three bridges in the district need urgent "
    "work before the end of the year. After a long debate, the council voted seven to four in favour of "
    "the library plan. Work on the roof will begin in the spring, and the library is expected to open in "
    "two years. Residents will be invited to a public meeting next month to share their ideas for the "
    "community hall.",
    # A product recall notice.
    "Brightway Appliances has announced a voluntary recall of its Model K20 electric kettle after "
    "receiving reports that the handle can come loose during use. The recall affects about 35,000 "
    "kettles sold between March and August of this year. No serious injuries have been reported, but two "
    "customers said they were splashed with hot water when the handle moved. Customers should stop using "
    "the kettle immediately and check the serial number printed on the base. Affected units have serial "
    "numbers beginning with K20-24. Brightway will send a free replacement kettle to every customer who "
    "registers on its website or calls its customer service line. Customers do not need a receipt to "
    "take part in the recall. \"The safety of our customers is our first priority, and we apologise for "
    "the inconvenience,\" the company said in a statement. The faulty handles were traced to a batch of "
    "screws from a new supplier, which has since been replaced. Other Brightway kettles are not affected.",
    # A study summary.
    "A two-year study of 240 primary school pupils has found that children who read aloud to a dog "
    "improved their reading more than children who read aloud to an adult. The study was carried out in "
    "twelve schools by researchers at a regional university. Once a week, each child spent fifteen "
    "minutes reading to either a trained therapy dog or a volunteer. At the end of the study, the "
    "children in the dog group had gained on average four months more in reading age than the others. "
    "The researchers believe that the dogs made the children feel less anxious. \"A dog does not correct "
    "you or look at the clock,\" said Dr Helen Marsh, who led the study. Teachers also reported that "
    "the children in the dog group were more willing to read in class. However, the researchers warn "
    "that the study was small and that the results should be tested in more schools. They also note "
    "that not every child likes dogs, and that some children have allergies.",
    # A travel guide entry.
    "The village of Santa Lucia sits on a narrow ridge above the river valley, about forty minutes by "
    "bus from the coast. Its stone houses are painted in shades of yellow and pink, and the main square "
    "is shaded by two enormous plane trees. The church of San Martino, built in the twelfth century, "
    "contains a painted wooden ceiling that is one of the best preserved in the region. The church is "
    "open every morning from nine until noon, and entry is free. On the first Sunday of every month, a "
    "market fills the square with local cheese, honey, olive oil and hand-made baskets. Visitors who "
    "want to walk can follow the old mule track down to the river, which takes about an hour and passes "
    "several abandoned mills. The walk back up is steep, so bring water and good shoes. There is one "
    "small hotel in the village, with eight rooms, and it is usually full in August. Most visitors stay "
    "on the coast and come up for the day.",
    # A club newsletter.
    "The Riverside Cycling Club had its busiest season ever this year, with 87 members taking part in at "
    "least one ride. Our Saturday morning rides now run in three groups, so that beginners and experienced "
    "riders can both enjoy the route at their own speed. The highlight of the summer was the charity ride "
    "to the coast, which covered 110 kilometres and raised 6,400 pounds for the children's hospital. "
    "Thank you to everyone who rode, donated or helped at the food stops. We also want to thank Sam "
    "Hughes, who has led the beginners' group for five years and is stepping down this autumn. \"Seeing "
    "people finish their first fifty-kilometre ride has been the best part of every year,\" Sam told us. "
    "We are looking for a new volunteer to take over the beginners' group. Please speak to the committee "
    "if you are interested. The annual dinner will be held on 30 November at the Bridge Inn, and tickets "
    "cost 25 pounds including a three-course meal.",
    # A library announcement.
    "From the first of March, the Northgate Public Library will open on Sundays for the first time in its "
    "history. The new Sunday hours will run from eleven in the morning until four in the afternoon. The "
    "change follows a survey of 1,900 residents, in which more than half said that they could not visit "
    "the library during the week because of work or school. \"We want the library to fit around people's "
    "lives, not the other way round,\" said the head librarian, Tom Adeyemi. To pay for the extra hours, "
    "the library will close one hour earlier on Wednesday evenings, when it is usually quiet. The "
    "children's reading corner, the computer room and the local history archive will all be open on "
    "Sundays. A storytelling session for children under seven will take place every Sunday at noon. "
    "Library cards can now also be renewed online, and the late fee for children's books has been "
    "removed completely.",
    # A weather warning.
    "The national weather service has issued an amber warning for heavy snow across the northern hills "
    "from Thursday evening until Saturday morning. Between ten and twenty centimetres of snow are "
    "expected above 300 metres, with up to forty centimetres on the highest ground. Strong easterly "
    "winds will cause drifting, and some roads are likely to be closed. \"Travel could become very "
    "difficult, and some rural communities may be cut off for a day or more,\" the forecaster said. "
    "Drivers are advised to avoid unnecessary journeys and to carry a blanket, water and a charged phone "
    "if they must travel. Train services on the hill line will run a reduced timetable on Friday. "
    "Schools will decide on Friday morning whether to close, and parents should check school websites "
    "before seven o'clock. Temperatures will fall to minus eight degrees overnight, so people are asked "
    "to check on elderly neighbours. Milder air is expected to arrive on Sunday, bringing rain and a "
    "risk of flooding as the snow melts.",
    # A company update.
    "Greenleaf Foods reported a ten per cent rise in sales for the year, reaching 48 million pounds, "
    "helped by strong demand for its range of frozen vegetable meals. Profits rose more slowly, by three "
    "per cent, because the cost of packaging and transport increased sharply during the year. The "
    "company opened a second factory in the spring and now employs 410 people, up from 330 a year ago. "
    "\"Our customers want simple, healthy food that is quick to prepare, and that is exactly what we "
    "make,\" said the chief executive, Laura Brennan. Greenleaf plans to switch all of its packaging to "
    "recyclable cardboard by the end of next year. It will also start selling its meals in two "
    "supermarket chains abroad. However, the company warned that the coming year will be harder, as "
    "prices for frozen peas and beans have doubled after a poor harvest. Shareholders will receive a "
    "dividend of 4.2 pence per share, the same as last year.",
    # A museum exhibition.
    "A new exhibition at the City Museum tells the story of the river that runs through the middle of "
    "the town. More than two hundred objects are on display, from stone tools found on the riverbank to "
    "a wooden boat that carried coal in the nineteenth century. Visitors can listen to recordings of "
    "people who worked on the river, including a lock keeper who started work in 1952 at the age of "
    "fifteen. \"The river made this town, and most people walk past it every day without thinking about "
    "it,\" said the curator, Ines Moreau. One room shows how the river was cleaned up in the 1980s, when "
    "salmon returned for the first time in a hundred years. Children can build their own model dam and "
    "watch how the water changes its course. The exhibition is free and runs until the end of September. "
    "Guided walks along the river path leave from the museum entrance every Saturday at two o'clock.",
    # A school notice.
    "Parents are reminded that the school trip to the science centre will take place on Wednesday, 12 "
    "June. Pupils should arrive at school by eight fifteen, as the coach will leave at half past eight "
    "and will not be able to wait for latecomers. We expect to return by four o'clock. Pupils should "
    "wear school uniform and bring a packed lunch, a drink in a plastic bottle and a waterproof coat. "
    "Glass bottles, fizzy drinks and mobile phones are not allowed on the trip. The cost of the trip is "
    "twelve pounds, which covers the coach and the entrance fee. Payment should be made through the "
    "school website by Friday, 7 June. If the cost is a problem for your family, please speak to the "
    "school office in confidence. \"The science centre is always one of the highlights of the year, and "
    "the children learn a great deal,\" said the head teacher, Mr Daniel Evans. Any medication your "
    "child needs must be handed to the class teacher on the morning of the trip.",
]

_SUMMARY_ASKS = [
    "Summarize the passage below in three or four sentences. Quote its key sentences word for word "
    "in double quotes.",
    "Write a short summary of this text. Use direct quotations of the most important sentences.",
    "Give a summary of the following text for a busy reader, quoting the sentences that matter most.",
]


def _passage(key: str, max_words: int = SUMMARY_MAX_WORDS) -> str:
    """Leading paragraphs of pydoc topic `key`, at most `max_words` words."""
    kept, words = [], 0
    for para in _pydoc.topics[key].strip().split("\n\n"):
        n = len(para.split())
        if words + n > max_words:
            break
        kept.append(para)
        words += n
    return "\n\n".join(kept)


def _summary_prompts() -> list[dict]:
    out = []
    docs = [_passage(key) for key in _SUMMARY_TOPICS] + _ORIGINAL_PASSAGES
    for i, doc in enumerate(docs, 1):
        text = f'{_SUMMARY_ASKS[i % len(_SUMMARY_ASKS)]}\n\n"""\n{doc}\n"""'
        out.append({"id": f"summary-{i:02d}", "category": "summary", "messages": _user(text), "references": [doc]})
    return out


# --- doc_qa: (pydoc topic, question, answer span of the topic text). -----------------------------

_DOC_QA = [
    ("assert", "Which command line option requests optimization, making __debug__ False?", '"-O"'),
    ("del", "What exception is raised when a deleted name is unbound?", '"NameError"'),
    ("return", "In a generator function, which exception does a return statement cause to be raised?",
     '"StopIteration"'),
    ("global", "Besides exec(), which built-in functions does the programmer's note say the same applies to?",
     '"eval()" and "compile()" functions'),
    ("nonlocal", "Which PEP is the specification for the nonlocal statement?", "PEP 3104"),
    ("break", "What happens to the loop control target when a for loop is terminated by break?",
     "the loop control target keeps its current value"),
    ("while", "What does a break statement executed in the first suite of a while loop do?",
     "terminates the loop without executing the \"else\" clause’s suite"),
    ("truth", "When is an object considered false by default?",
     'its class defines either a "__bool__()" method that returns "False" or a "__len__()" method that returns zero'),
    ("integers", "What are underscores in integer literals used for?",
     "They can be used to group digits for enhanced readability"),
    ("floating", "Which radix is used for the integer and exponent parts of a floating point literal?",
     "radix 10"),
    ("typesmodules", "What is the only special operation on a module?", "attribute access"),
    ("power", "What does the expression 10**-2 return?", '"0.01"'),
    ("booleans", "What does the expression not 'foo' produce?", 'produces "False" rather than "\'\'"'),
    ("lambda", "What can functions created with lambda expressions not contain?", "statements or annotations"),
]

_DOC_QA_FORMS = [
    "Answer the question using only the document below. Quote the exact words of the document "
    "that answer it.\n\nDocument:\n{doc}\n\nQuestion: {question}",
    "Read this documentation and answer the question with a quotation from it.\n\n{doc}\n\n"
    "Question: {question}",
]


def _doc_qa_prompts() -> list[dict]:
    out = []
    for i, (key, question, answer) in enumerate(_DOC_QA, 1):
        doc = _pydoc.topics[key].strip()
        text = _DOC_QA_FORMS[i % len(_DOC_QA_FORMS)].format(doc=doc, question=question)
        out.append({"id": f"docqa-{i:02d}", "category": "doc_qa", "messages": _user(text),
                    "references": [doc], "answer": answer})
    return out


# --- multi_turn: earlier turns written for this suite; the last user turn asks to repeat/modify. --

_CHATS = [
    [
        ("user", "I'm planning a picnic for six people. Can you write me a shopping list?"),
        ("assistant", "Here is a shopping list for a picnic for six:\n\n- 2 baguettes\n- 1 block of cheddar "
         "cheese\n- 200 g sliced ham\n- 1 jar of pickles\n- 6 apples\n- 1 punnet of strawberries\n- 1 bag of "
         "crisps\n- 2 bottles of sparkling water\n- paper plates and napkins"),
        ("user", "Add something vegetarian and something sweet."),
        ("assistant", "Updated list:\n\n- 2 baguettes\n- 1 block of cheddar cheese\n- 200 g sliced ham\n- 1 tub "
         "of hummus\n- 2 cucumbers and a bag of carrots for dipping\n- 1 jar of pickles\n- 6 apples\n- 1 punnet "
         "of strawberries\n- 1 lemon drizzle cake\n- 1 bag of crisps\n- 2 bottles of sparkling water\n- paper "
         "plates and napkins"),
        ("user", "Please repeat the full updated list, but sorted alphabetically."),
    ],
    [
        ("user", "Write a short Python function that checks whether a string is a palindrome."),
        ("assistant", "```python\ndef is_palindrome(text):\n    cleaned = [c.lower() for c in text if "
         "c.isalnum()]\n    return cleaned == cleaned[::-1]\n```\n\nIt ignores case, spaces and punctuation, so "
         "`is_palindrome(\"A man, a plan, a canal: Panama\")` returns `True`."),
        ("user", "Can you add a docstring to it?"),
        ("assistant", "```python\ndef is_palindrome(text):\n    \"\"\"Return True if text reads the same "
         "forwards and backwards.\n\n    Case, spaces and punctuation are ignored.\n    \"\"\"\n    cleaned = "
         "[c.lower() for c in text if c.isalnum()]\n    return cleaned == cleaned[::-1]\n```"),
        ("user", "Now show the same function again with type hints added, keeping the docstring."),
    ],
    [
        ("system", "You are a concise assistant for a small bakery."),
        ("user", "Draft a notice telling customers we are closed on Monday for maintenance."),
        ("assistant", "Dear customers,\n\nOur bakery will be closed on Monday, 14 October, while we carry out "
         "maintenance on our ovens. We will reopen on Tuesday at 7 am with fresh bread and pastries as usual. "
         "Thank you for your understanding.\n\nThe Corner Bakery team"),
        ("user", "Good. Change the date to Monday, 21 October, and repeat the whole notice."),
    ],
    [
        ("user", "What are the planets of the solar system in order from the Sun?"),
        ("assistant", "In order from the Sun: Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune."),
        ("user", "Which of them are gas giants?"),
        ("assistant", "Jupiter and Saturn are the gas giants. Uranus and Neptune are often called ice giants "
         "because they contain more water, ammonia and methane ices."),
        ("user", "Repeat the list of planets in order from the Sun, and mark each gas giant and ice giant."),
    ],
    [
        ("user", "Give me a recipe for a simple tomato soup."),
        ("assistant", "Simple tomato soup (serves 4)\n\nIngredients:\n- 1 tablespoon olive oil\n- 1 onion, "
         "chopped\n- 2 cloves garlic, crushed\n- 800 g canned chopped tomatoes\n- 500 ml vegetable stock\n- 1 "
         "teaspoon sugar\n- salt and pepper\n\nMethod:\n1. Soften the onion in the oil for 5 minutes.\n2. Add the "
         "garlic and cook for 1 minute.\n3. Add the tomatoes, stock and sugar and simmer for 20 minutes.\n4. "
         "Blend until smooth and season with salt and pepper."),
        ("user", "Can I add fresh basil?"),
        ("assistant", "Yes. Add a handful of fresh basil leaves to the ingredients, and in step 4 stir the torn "
         "leaves into the soup just before blending."),
        ("user", "Write out the full recipe again with the basil added to the ingredients and the method."),
    ],
    [
        ("user", "Write a haiku about autumn rain."),
        ("assistant", "Cold rain on the roof\nmaple leaves drift down the street\nthe kettle whistles"),
        ("user", "Write another one about the same rain at night."),
        ("assistant", "Midnight, the rain stops\none last drop from the gutter\nthe whole house listens"),
        ("user", "Copy both haiku exactly as you wrote them above, one after the other, each with a title."),
    ],
    [
        ("user", "Explain what a Python list comprehension is in two sentences."),
        ("assistant", "A list comprehension builds a new list by applying an expression to each item of an "
         "iterable, optionally keeping only the items that pass a condition. For example, "
         "`[x * x for x in range(5) if x % 2 == 0]` produces `[0, 4, 16]`."),
        ("user", "And a dictionary comprehension?"),
        ("assistant", "A dictionary comprehension works the same way but produces key-value pairs, written "
         "`{key: value for item in iterable}`. For example, `{w: len(w) for w in [\"a\", \"bb\"]}` produces "
         "`{\"a\": 1, \"bb\": 2}`."),
        ("user", "Repeat both of your explanations word for word, one after the other, including both examples."),
    ],
    [
        ("user", "Help me write an email to my landlord about a leaking kitchen tap."),
        ("assistant", "Subject: Leaking kitchen tap at Flat 3\n\nDear Mr Patel,\n\nI am writing to let you know "
         "that the kitchen tap in Flat 3 has been leaking since last Thursday. Water drips constantly even when "
         "the tap is fully closed, and a small puddle forms under the sink overnight. Could you arrange for a "
         "plumber to look at it this week? I am at home most evenings after 6 pm.\n\nKind regards,\nAnna Berg"),
        ("user", "Make it a bit more urgent, the cupboard under the sink is getting damp."),
        ("assistant", "Subject: Urgent: leaking kitchen tap at Flat 3\n\nDear Mr Patel,\n\nThe kitchen tap in "
         "Flat 3 has been leaking since last Thursday, and the cupboard under the sink is now getting damp. "
         "Water drips constantly even when the tap is fully closed. Could you please arrange for a plumber to "
         "come as soon as possible, ideally within the next two days? I am at home most evenings after 6 pm."
         "\n\nKind regards,\nAnna Berg"),
        ("user", "Perfect. Repeat the final email exactly, but sign it with my full name, Anna Maria Berg."),
    ],
    [
        ("user", "List five tips for studying effectively."),
        ("assistant", "1. Study in short sessions of 25 to 45 minutes with breaks in between.\n2. Test yourself "
         "instead of rereading your notes.\n3. Spread your revision over several days.\n4. Explain the material "
         "out loud as if teaching someone else.\n5. Sleep well, especially the night before an exam."),
        ("user", "Which one is most important in your opinion?"),
        ("assistant", "Testing yourself is probably the most important, because retrieving information from "
         "memory strengthens it far more than reading it again."),
        ("user", "Repeat the five tips, but move the most important one to the top."),
    ],
    [
        ("user", "Write a SQL query that returns the ten customers with the highest total order value."),
        ("assistant", "```sql\nSELECT c.customer_id, c.name, SUM(o.amount) AS total_value\nFROM customers AS "
         "c\nJOIN orders AS o ON o.customer_id = c.customer_id\nGROUP BY c.customer_id, c.name\nORDER BY "
         "total_value DESC\nLIMIT 10;\n```"),
        ("user", "Only count orders from 2024."),
        ("assistant", "```sql\nSELECT c.customer_id, c.name, SUM(o.amount) AS total_value\nFROM customers AS "
         "c\nJOIN orders AS o ON o.customer_id = c.customer_id\nWHERE o.order_date >= '2024-01-01' AND "
         "o.order_date < '2025-01-01'\nGROUP BY c.customer_id, c.name\nORDER BY total_value DESC\nLIMIT 10;\n```"),
        ("user", "Now change it to return the top 20 instead of 10 and show the full query again."),
    ],
    [
        ("user", "Give me a packing list for a three-day hiking trip."),
        ("assistant", "- Backpack (40 litres)\n- Tent, sleeping bag and sleeping mat\n- Stove, fuel and a small "
         "pot\n- Water filter and two 1-litre bottles\n- Food for three days\n- Rain jacket and warm fleece\n- "
         "Two pairs of hiking socks\n- Map, compass and head torch\n- First aid kit and sun cream"),
        ("user", "The weather forecast says it will be cold at night."),
        ("assistant", "Then add a warm hat, gloves, thermal base layers and a sleeping bag rated to at least "
         "-5 C instead of a summer bag."),
        ("user", "Write the complete packing list again with those changes included."),
    ],
    [
        ("user", "Summarize the rules of tic-tac-toe."),
        ("assistant", "Tic-tac-toe is played by two players on a 3 by 3 grid. Players take turns placing their "
         "mark, X or O, in an empty square. The first player to get three marks in a row, horizontally, "
         "vertically or diagonally, wins. If all nine squares are filled without a winner, the game is a draw."),
        ("user", "Turn that into a numbered list of rules."),
        ("assistant", "1. Two players play on a 3 by 3 grid.\n2. Players take turns placing their mark, X or O, "
         "in an empty square.\n3. The first player to get three marks in a row, horizontally, vertically or "
         "diagonally, wins.\n4. If all nine squares are filled without a winner, the game is a draw."),
        ("user", "Repeat the numbered rules and add a fifth rule saying that X always moves first."),
    ],
    [
        ("user", "Write a short product description for a reusable water bottle."),
        ("assistant", "Stay hydrated wherever you go with our 750 ml stainless steel bottle. Double-walled "
         "insulation keeps drinks cold for 24 hours or hot for 12. The leak-proof lid fits in one hand, and the "
         "powder-coated finish resists scratches. Free from BPA and dishwasher safe."),
        ("user", "Write one more sentence about the colours it comes in."),
        ("assistant", "Choose from five colours: forest green, ocean blue, sand, charcoal and coral."),
        ("user", "Repeat your product description word for word, then add the sentence about colours as its "
         "last line."),
    ],
    [
        ("user", "Create a weekly cleaning schedule for a shared flat with three people: Ali, Ben and Chloe."),
        ("assistant", "Monday: Ali cleans the kitchen.\nTuesday: Ben cleans the bathroom.\nWednesday: Chloe "
         "vacuums the living room.\nThursday: Ali takes out the recycling.\nFriday: Ben cleans the kitchen.\n"
         "Saturday: Chloe cleans the bathroom.\nSunday: everyone tidies their own room."),
        ("user", "Ben is away on Fridays."),
        ("assistant", "Swap Ben and Chloe on Friday and Saturday: Chloe cleans the kitchen on Friday and Ben "
         "cleans the bathroom on Saturday."),
        ("user", "Write out the whole schedule again with that swap applied."),
    ],
]


def _multi_turn_prompts() -> list[dict]:
    out = []
    for i, turns in enumerate(_CHATS, 1):
        messages = [{"role": role, "content": text} for role, text in turns]
        refs = [m["content"] for m in messages if m["role"] == "assistant"]
        out.append({"id": f"chat-{i:02d}", "category": "multi_turn", "messages": messages, "references": refs})
    return out


# --- story: open-ended, nothing to copy. ---------------------------------------------------------

_STORIES = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Tell a story about a robot that learns to bake bread in a small village.",
    "Write a bedtime story about a fox who is afraid of the dark.",
    "Write the opening of a mystery novel set on a night train through the mountains.",
    "Tell a story about two friends who get lost in a city they have never visited.",
    "Write a fable about a tortoise who wants to fly, with a moral at the end.",
    "Write a story about a girl who discovers that her grandmother's old radio can talk.",
    "Describe a day in the life of a street musician in a busy market town.",
    "Write a science fiction story about the first garden grown on the Moon.",
    "Tell a story about a dragon who runs a library and hates late returns.",
    "Write a short story about a detective cat solving the case of the missing sandwich.",
    "Write a story told through the diary entries of a sailor crossing the Atlantic in 1850.",
    "Tell a funny story about a wizard whose spells always rhyme by accident.",
    "Write a story about an old clockmaker who builds a clock that runs backwards.",
]


def _story_prompts() -> list[dict]:
    return [{"id": f"story-{i:02d}", "category": "story", "messages": _user(text), "references": []}
            for i, text in enumerate(_STORIES, 1)]


PROMPTS: list[dict] = (
    _code_prompts() + _summary_prompts() + _doc_qa_prompts() + _multi_turn_prompts() + _story_prompts()
)


def by_category(category: str) -> list[dict]:
    """Prompts of one category (one of CATEGORIES)."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {', '.join(CATEGORIES)}")
    return [p for p in PROMPTS if p["category"] == category]


def grounded() -> list[dict]:
    """Input-grounded prompts: every category except open-ended stories."""
    return [p for p in PROMPTS if p["category"] in GROUNDED]


def ids() -> list[str]:
    """Prompt ids in suite order."""
    return [p["id"] for p in PROMPTS]


def get(prompt_id: str) -> dict:
    """The prompt with this id."""
    for p in PROMPTS:
        if p["id"] == prompt_id:
            return p
    raise KeyError(prompt_id)
