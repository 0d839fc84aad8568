"""The synthetic text the embedded model's tokenizer is trained on (toy_model.py's
``build_tokenizer``): greetings, facts, word problems, tool calls, code, small talk and
prose, drawn from a seeded generator so that the same seed gives the same corpus, and so
the same vocabulary and the same model files.
"""

from __future__ import annotations

import json
import random

_NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack",
          "Kai", "Lena", "Maya", "Noah", "Omar", "Priya", "Sam", "Tara", "Yuki", "Zoe"]
_ITEMS = ["apple", "book", "pencil", "cookie", "marble", "ticket", "sticker", "coin",
          "flower", "shell", "card", "box", "egg", "orange", "cup", "stone"]
_CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid",
             "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima",
             "Germany": "Berlin", "India": "New Delhi", "Brazil": "Brasilia",
             "Norway": "Oslo", "Australia": "Canberra", "Mexico": "Mexico City"}
_TOPICS = ["the weather", "a recipe for soup", "learning Python", "a good book", "sleep",
           "the history of tea", "planning a trip", "saving money", "writing an email",
           "a birthday party", "running a marathon", "the solar system", "my garden"]
_GREETINGS = ["Hello", "Hi", "Hey", "Good morning", "Good evening", "Hi there", "Welcome"]
_OFFERS = ["How can I help you today?", "What can I do for you?",
           "What would you like to know?", "Is there anything I can help with?",
           "Tell me what you need and I will do my best."]
_OPENERS = ["Sure", "Of course", "Certainly", "Great question", "Happy to help", "Okay"]
_TOOLS = {"get_weather": ("city", list(_CAPITALS.values())),
          "search_web": ("query", _TOPICS),
          "get_time": ("timezone", ["UTC", "Europe/Paris", "Asia/Tokyo", "America/Lima"]),
          "calculator": ("expression", ["2 + 3", "12 * 4", "100 / 5", "7 - 9"])}
# Common English words, so that ordinary prose tokenizes into whole words.
_COMMON_WORDS = (
    "the of and to a in is it you that he was for on are with as I his they be at one have this "
    "from or had by word but what some we can out other were all there when up use your how said "
    "an each she which do their time if will way about many then them write would like so these "
    "her long make thing see him two has look more day could go come did number sound no most "
    "people my over know water than call first who may down side been now find any new work part "
    "take get place made live where after back little only round man year came show every good me "
    "give our under name very through just form sentence great think say help low line differ turn "
    "cause much mean before move right boy old too same tell does set three want air well also "
    "play small end put home read hand port large spell add even land here must big high such "
    "follow act why ask men change went light kind off need house picture try us again animal "
    "point mother world near build self earth father head stand own page should country found "
    "answer school grow study still learn plant cover food sun four between state keep eye never "
    "last let thought city tree cross farm hard start might story saw far sea draw left late run "
    "while press close night real life few north open seem together next white children begin got "
    "walk example ease paper group always music those both mark often letter until mile river car "
    "feet care second enough plain girl usual young ready above ever red list though feel talk "
    "bird soon body dog family direct pose leave song measure door product black short numeral "
    "class wind question happen complete ship area half rock order fire south problem piece told "
    "knew pass since top whole king space heard best hour better true during hundred five remember "
    "step early hold west ground interest reach fast verb sing listen six table travel less "
    "morning ten simple several vowel toward war lay against pattern slow center love person money "
    "serve appear road map rain rule govern pull cold notice voice unit power town fine certain "
    "fly fall lead cry dark machine note wait plan figure star noun field rest correct able pound "
    "done beauty drive stood contain front teach week final gave green oh quick develop ocean warm "
    "free minute strong"
)
_CODE = ["def {f}(a, b):\n    return a {op} b\n", "for i in range({n}):\n    print(i)\n",
         "import json\n\ndata = json.loads(text)\n", "if {v} > {n}:\n    {v} = {n}\n",
         "result = [x * {n} for x in values]\n", "class {F}:\n    def __init__(self):\n"
         "        self.count = {n}\n", "const {v} = await fetch(url);\n"]


def synthetic_corpus(seed: int, documents: int) -> list[str]:
    """Chat-like English documents: greetings, facts, word problems, tool calls, code."""
    rng = random.Random(seed)
    makers = [_greeting, _fact, _word_problem, _tool_call, _code, _small_talk, _prose]
    return [makers[i % len(makers)](rng) for i in range(documents)]


def _greeting(rng: random.Random) -> str:
    name = rng.choice(_NAMES)
    return f"user: {rng.choice(_GREETINGS)}!\nassistant: {rng.choice(_GREETINGS)}, {name}! " \
        f"{rng.choice(_OFFERS)}"


def _fact(rng: random.Random) -> str:
    country, capital = rng.choice(sorted(_CAPITALS.items()))
    return f"user: What is the capital of {country}?\nassistant: {rng.choice(_OPENERS)}. " \
        f"The capital of {country} is {capital}."


def _word_problem(rng: random.Random) -> str:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    if rng.random() < 0.5:
        question = f"{name} has {a} {item}s and buys {b} more. How many {item}s does " \
            f"{name} have now?"
        answer = f"{name} has {a} + {b} = {a + b} {item}s. The answer is {a + b}."
    else:
        a += b
        question = f"{name} had {a} {item}s and gave {b} away. How many are left?"
        answer = f"{a} - {b} = {a - b}, so {name} has {a - b} {item}s left. " \
            f"The answer is {a - b}."
    return f"user: {question}\nassistant: {answer}"


def _tool_call(rng: random.Random) -> str:
    tool = rng.choice(sorted(_TOOLS))
    key, values = _TOOLS[tool]
    call = json.dumps({"name": tool, "arguments": {key: rng.choice(values)}})
    result = json.dumps({"ok": True, "value": rng.randint(0, 999)})
    return f"<tool_call>\n{call}\n</tool_call>\ntool: {result}\nassistant: Done, the result " \
        f"is {rng.randint(0, 99)}."


def _code(rng: random.Random) -> str:
    return rng.choice(_CODE).format(
        f=rng.choice(["add", "scale", "merge", "total"]), F=rng.choice(["Counter", "Cache"]),
        op=rng.choice(["+", "-", "*"]), n=rng.randint(1, 99), v=rng.choice(["x", "size"]),
    )


def _small_talk(rng: random.Random) -> str:
    return f"user: Can you tell me about {rng.choice(_TOPICS)}?\nassistant: " \
        f"{rng.choice(_OPENERS)}! Here is a short answer about {rng.choice(_TOPICS)}. " \
        "Let me know if you want more details, or ask me another question."


def _prose(rng: random.Random) -> str:
    words = _COMMON_WORDS.split()
    sentences = [" ".join(rng.choices(words, k=rng.randint(5, 14))) for _ in range(3)]
    return " ".join(s[0].upper() + s[1:] + rng.choice(".!?") for s in sentences)
