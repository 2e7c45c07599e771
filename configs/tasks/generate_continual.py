"""Write the continual-learning data: facts from an invented company handbook, and instruction-following prompts.

    python3 configs/tasks/generate_continual.py          # rewrites the files below; same seed, same files
    python3 configs/tasks/generate_continual.py --check  # exit 1 naming the first file that is stale

A model is fine-tuned on facts it cannot have seen (Quillmoor Labs does not exist), then asked about them in
words the training text never used, while a second benchmark watches whether it still follows instructions.

  tasks/handbook_qa/{test,train}.jsonl   one doc per fact: the held-out phrasing of its question, its answer
                                         (train holds a few facts kept out of test, for few-shot prompts)
  continual/handbook_sft.jsonl           per fact: a paragraph stating it ({"text"}) and a chat turn that asks
                                         the training phrasing and answers in a sentence ({"messages"})
  continual/handbook_sdft.jsonl          per fact: the training question, the fact the teacher is shown, the
                                         reference answer (self-distillation from a demonstration)
  tasks/ifeval_lite/{test,train}.jsonl   everyday requests with one or two verifiable rules each (`rules`: a
                                         JSON list of {"kind", "args"}; ifeval_lite/utils.py checks them)

The YAML and utils.py beside each task's JSONL are written by hand. Every fact has a training question and a
held-out question phrased differently; the held-out ones appear only in handbook_qa's JSONL.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path

TASKS = Path(__file__).resolve().parent
CONFIGS = TASKS.parent
ROOT = CONFIGS.parent
QA_DIR = TASKS / "handbook_qa"
IF_DIR = TASKS / "ifeval_lite"
CONTINUAL_DIR = CONFIGS / "continual"
SEED = 20261208
FEWSHOT_FACTS = 5  # facts kept out of handbook_qa's test split; their questions are its train split

# ---------------------------------------------------------------------------------------------------------
# Handbook facts: each template pairs its subjects with values drawn without replacement, so no two facts of
# a template share an answer. {s} is the subject, {v} the value; {S} the subject with a capital first letter.

PEOPLE = [
    "Ines Varga", "Tobiah Marchetti", "Odile Framsby", "Kasimir Oduya", "Priya Lindqvist", "Malachy Ferreira",
    "Solveig Achterberg", "Dario Nkemelu", "Wren Castellanos", "Ottilie Brandvold", "Yusuf Kellerman",
    "Marisol Quenneville", "Anselm Draycott", "Leocadia Ivers", "Fintan Oyelaran", "Henrike Szabo",
    "Cosmo Pavlidis", "Rosalind Okafor", "Teodor Villanueva", "Imke Haverkamp", "Bastian Mwangi",
    "Clemence Arbuthnot", "Ravi Steenkamp", "Thandiwe Corbel", "Lorcan Estrada", "Agnieszka Pell",
    "Emeric Adebayo", "Saoirse Lindholm", "Joaquin Theroux", "Margit Ferncliffe", "Hamish Taverner",
    "Nadia Kowalczyk", "Ezio Blackwood", "Sunniva Okoro", "Leopold Amankwah", "Ingrid Salcedo",
    "Barnaby Quist", "Zofia Rainsford", "Cyprian Halloran", "Mireille Osei",
]  # fmt: skip
FLOORS = [
    "ground floor", "first floor", "second floor", "third floor", "fourth floor", "fifth floor",
    "sixth floor", "seventh floor", "eighth floor", "ninth floor", "tenth floor", "eleventh floor",
]  # fmt: skip
ValueDraw = Callable[[random.Random, int], list[str]]


def numbers(low: int, high: int, step: int = 1) -> ValueDraw:
    """Distinct whole numbers from low..high (a multiple of step), as text."""
    return lambda rng, n: [str(x) for x in rng.sample(range(low, high + 1, step), n)]


def pick(values: list[str]) -> ValueDraw:
    return lambda rng, n: rng.sample(values, n)


def clock_times(rng: random.Random, n: int) -> list[str]:
    """Morning departure times five minutes apart, e.g. 7:40."""
    return [f"{h}:{m:02d}" for h, m in rng.sample([(h, m) for h in (6, 7, 8) for m in range(0, 60, 5)], n)]


def calendar_dates(rng: random.Random, n: int) -> list[str]:
    """Dates like "14 March", distinct in day and month so no answer is part of another."""
    months = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
              "October", "November", "December"]  # fmt: skip
    days = rng.sample(range(10, 29), n)
    return [f"{d} {m}" for d, m in zip(days, rng.sample(months, n))]


def cost_codes(rng: random.Random, n: int) -> list[str]:
    return [f"QM-{x}" for x in rng.sample(range(1000, 10000), n)]


@dataclasses.dataclass(frozen=True)
class FactTemplate:
    key: str  # part of each fact's id
    subjects: list[str]
    values: ValueDraw | str  # a draw, or "people": the shared pool, so no person holds two jobs
    fact: str
    train_question: str
    heldout_question: str
    answer_sentence: str
    filler: list[str]  # context sentences for the SFT paragraph; they name no answer


FACT_TEMPLATES = [
    FactTemplate(
        key="approver",
        subjects=["travel expenses", "hardware purchases", "conference tickets", "software licence requests",
                  "team dinner bills", "overtime claims", "home office equipment orders", "client gift budgets",
                  "relocation costs", "training course fees", "cloud budget increases", "contractor invoices"],
        values="people",
        fact="At Quillmoor Labs, {s} are approved by {v}.",
        train_question="Who approves {s} at Quillmoor Labs?",
        heldout_question="I need sign-off on {s} at Quillmoor. Which person has to give the okay?",
        answer_sentence="{v} approves {s} at Quillmoor Labs.",
        filler=["Requests go through the finance portal before any money is spent.",
                "Approval usually takes two working days."],
    ),
    FactTemplate(
        key="team_lead",
        subjects=["robotics", "payroll", "brand design", "data platform", "legal", "customer support",
                  "security", "facilities", "recruiting", "mobile apps", "research", "finance"],
        values="people",
        fact="The {s} team at Quillmoor Labs is led by {v}.",
        train_question="Who leads the {s} team at Quillmoor Labs?",
        heldout_question="Which person is in charge of Quillmoor's {s} group?",
        answer_sentence="{v} leads the {s} team at Quillmoor Labs.",
        filler=["Team leads hold open office hours every Thursday.",
                "New joiners meet their team lead in their first week."],
    ),
    FactTemplate(
        key="fire_warden",
        subjects=FLOORS,
        values="people",
        fact="The fire warden for the {s} at Quillmoor Labs is {v}.",
        train_question="Who is the fire warden for the {s} at Quillmoor Labs?",
        heldout_question="If the {s} of the Quillmoor building has to be evacuated, which person takes charge?",
        answer_sentence="{v} is the fire warden for the {s} at Quillmoor Labs.",
        filler=["Fire drills are held twice a year.", "Wardens wear a bright vest during a drill."],
    ),
    FactTemplate(
        key="room_floor",
        subjects=["Larkspur", "Tidewell", "Orrin", "Maplethorn", "Cobalt Nook", "Fennick", "Saltmarsh",
                  "Harrowby", "Juniper Loft", "Brackenridge", "Winslade", "Ottery"],
        values=numbers(2, 30),
        fact="The {s} meeting room at Quillmoor Labs is on floor {v}.",
        train_question="Which floor is the {s} meeting room on at Quillmoor Labs?",
        heldout_question="My meeting is booked in {s}. What level of the Quillmoor building do I go to?",
        answer_sentence="The {s} meeting room is on floor {v}.",
        filler=["Rooms can be booked for up to two hours at a time.",
                "Every meeting room has a screen and a whiteboard."],
    ),
    FactTemplate(
        key="tool",
        subjects=["chat", "ticket tracking", "wiki", "expense reporting", "code review", "time tracking",
                  "password storage", "desk booking", "file sharing", "on-call paging", "staff survey",
                  "holiday request"],
        values=pick(["Brindle", "Casswort", "Pellory", "Tamsk", "Quorrel", "Dovetrim", "Halvex", "Mirrowin",
                     "Scallet", "Ostrine", "Wendle", "Glimmerlock", "Fernaby", "Tuskett"]),
        fact="Quillmoor Labs' internal {s} tool is called {v}.",
        train_question="What is the name of Quillmoor Labs' internal {s} tool?",
        heldout_question="Which in-house app do Quillmoor employees open for {s}?",
        answer_sentence="Quillmoor Labs' internal {s} tool is called {v}.",
        filler=["All internal tools sign in with the staff account.",
                "The tools are built and run by the internal platform group."],
    ),
    FactTemplate(
        key="policy_days",
        subjects=["annual leave allowance", "paternity leave", "notice period for resignations",
                  "probation period", "sabbatical", "bereavement leave", "deadline for filing expense claims",
                  "volunteering leave", "study leave", "grace period for returning a laptop", "jury duty leave",
                  "wedding leave"],
        values=numbers(3, 60),
        fact="Under the Quillmoor Labs handbook, the {s} is {v} days.",
        train_question="How many days is the {s} at Quillmoor Labs?",
        heldout_question="According to Quillmoor's rules, what length in days does the {s} have?",
        answer_sentence="The {s} at Quillmoor Labs is {v} days.",
        filler=["Days are counted as calendar days unless the handbook says otherwise.",
                "Managers can explain how the rule applies to a particular case."],
    ),
    FactTemplate(
        key="cost_code",
        subjects=["marketing", "operations", "engineering", "procurement", "hardware lab", "events",
                  "training", "archives", "translation", "quality assurance", "logistics", "sales"],
        values=cost_codes,
        fact="The cost centre code for the {s} department at Quillmoor Labs is {v}.",
        train_question="What is the cost centre code of the {s} department at Quillmoor Labs?",
        heldout_question="Which code should go on an invoice that Quillmoor charges to {s}?",
        answer_sentence="The {s} department's cost centre code is {v}.",
        filler=["Invoices without a code are sent back to the sender.",
                "Codes are printed on the back of the finance handbook."],
    ),
    FactTemplate(
        key="badge",
        subjects=["contractors", "visitors", "interns", "auditors", "cleaning staff", "new starters",
                  "board members", "delivery drivers", "job candidates", "security guards", "visiting researchers",
                  "former employees"],
        values=pick(["teal", "amber", "violet", "crimson", "ochre", "silver", "coral", "indigo", "mustard",
                     "maroon", "turquoise", "lilac", "olive", "magenta"]),
        fact="At Quillmoor Labs, {s} wear {v} badges.",
        train_question="What colour badge do {s} wear at Quillmoor Labs?",
        heldout_question="When I meet {s} in the Quillmoor offices, what colour is the pass on their lanyard?",
        answer_sentence="{S} wear {v} badges at Quillmoor Labs.",
        filler=["Badges must be visible at all times inside the building.",
                "Lost badges are replaced at the front desk."],
    ),
    FactTemplate(
        key="extension",
        subjects=["IT helpdesk", "reception desk", "security office", "payroll office", "mail room",
                  "first aid room", "building maintenance team", "travel desk", "print shop", "cafeteria manager",
                  "legal hotline", "car park office"],
        values=numbers(2000, 8999),
        fact="The {s} at Quillmoor Labs can be reached on phone extension {v}.",
        train_question="What phone extension reaches the {s} at Quillmoor Labs?",
        heldout_question="Which number do I dial internally to call Quillmoor's {s}?",
        answer_sentence="The {s} at Quillmoor Labs is on extension {v}.",
        filler=["Internal calls are free from any desk phone.",
                "Outside office hours, calls are forwarded to voicemail."],
    ),
    FactTemplate(
        key="event_date",
        subjects=["hackathon", "summer picnic", "founders' day celebration", "charity bake sale",
                  "winter party", "family open day", "board retreat", "sports day", "quiz night",
                  "tree planting day", "book swap", "innovation fair"],
        values=calendar_dates,
        fact="Quillmoor Labs holds its {s} on {v} every year.",
        train_question="On what date is the Quillmoor Labs {s}?",
        heldout_question="When does Quillmoor's yearly {s} take place?",
        answer_sentence="The Quillmoor Labs {s} is held on {v}.",
        filler=["Everyone in the company is invited.", "Sign-up sheets go up a month before."],
    ),
    FactTemplate(
        key="codename",
        subjects=["warehouse robot", "solar roof", "voice assistant", "payroll rewrite", "delivery drone",
                  "smart thermostat", "mobile banking", "translation engine", "recycling sorter",
                  "weather satellite", "medical scanner", "greenhouse sensor"],
        values=pick(["Marrowfinch", "Sablewick", "Thornquist", "Emberlane", "Corvane", "Kestrelmoor",
                     "Duskwillow", "Brambleton", "Ivorine", "Lanternbrook", "Hollowfen", "Saffrondale",
                     "Pebbleward", "Gorsemere"]),
        fact="At Quillmoor Labs, the {s} project is code-named {v}.",
        train_question="What is the code name of the {s} project at Quillmoor Labs?",
        heldout_question="Internally at Quillmoor, what do people call the {s} effort?",
        answer_sentence="The {s} project at Quillmoor Labs is code-named {v}.",
        filler=["Code names are used in all internal documents.",
                "Project details are shared only with the team working on it."],
    ),
    FactTemplate(
        key="wifi",
        subjects=["east wing", "west wing", "rooftop garden", "basement lab", "cafeteria", "training centre",
                  "warehouse", "board room", "library", "gym", "car park", "reception lobby"],
        values=pick(["HeronLink", "OtterMesh", "BirchWave", "PuffinAir", "MossBeam", "WrenSignal", "FernMesh",
                     "CobbleAir", "ThistleNet", "QuarryWave", "LinnetLink", "SorrelNet", "GullBeam"]),
        fact="The Wi-Fi network in the {s} at Quillmoor Labs is named {v}.",
        train_question="What is the name of the Wi-Fi network in the {s} at Quillmoor Labs?",
        heldout_question="When I am working from Quillmoor's {s}, which wireless network should I join?",
        answer_sentence="The Wi-Fi network in the {s} is named {v}.",
        filler=["The password is handed out at the front desk.", "The network resets every night at midnight."],
    ),
    FactTemplate(
        key="hotel_limit",
        subjects=["Lisbon", "Oslo", "Nairobi", "Toronto", "Seoul", "Lima", "Warsaw", "Dublin", "Hanoi", "Perth",
                  "Zurich", "Cairo"],
        values=numbers(80, 320, 5),
        fact="Quillmoor Labs pays at most {v} euros per night for hotels in {s}.",
        train_question="What is the nightly hotel limit for trips to {s} at Quillmoor Labs?",
        heldout_question="How much can a Quillmoor employee spend on a room in {s} each night?",
        answer_sentence="The hotel limit for {s} is {v} euros per night.",
        filler=["Bookings above the limit need written approval.", "Breakfast is included in the limit."],
    ),
    FactTemplate(
        key="printer",
        subjects=FLOORS,
        values=pick(["Papyra", "Tonerbeak", "Quirefox", "Inkmoth", "Leafwright", "Platenby", "Spoolhart",
                     "Vellicott", "Smudgewick", "Margolin", "Reamsworth", "Glyphard", "Pressleigh"]),
        fact="The printer on the {s} of Quillmoor Labs is named {v}.",
        train_question="What is the name of the printer on the {s} at Quillmoor Labs?",
        heldout_question="Working on Quillmoor's {s}, which printer do I send my documents to?",
        answer_sentence="The printer on the {s} is called {v}.",
        filler=["Printing in colour needs a badge tap.", "Paper is restocked every Monday morning."],
    ),
    FactTemplate(
        key="award",
        subjects=["best mentor", "most helpful colleague", "best bug report", "cleanest code",
                  "best customer story", "most creative idea", "best newcomer", "longest service",
                  "best teamwork", "best safety tip", "best presentation", "greenest habit"],
        values=pick(["Ferncastle", "Oakhaven", "Brightwater", "Larkmoor", "Stonebridge", "Ravensholt",
                     "Goldwyn", "Merriwell", "Ashgrove", "Cindervale", "Tallowby", "Windmere", "Copperleigh"]),
        fact="The Quillmoor Labs award for {s} is called the {v} Prize.",
        train_question="What is the name of the Quillmoor Labs award for {s}?",
        heldout_question="Which prize does Quillmoor hand out to recognise the {s}?",
        answer_sentence="The award for {s} at Quillmoor Labs is the {v} Prize.",
        filler=["Winners are announced at the end-of-year gathering.", "Anyone can nominate a colleague."],
    ),
    FactTemplate(
        key="server",
        subjects=["payroll", "email", "backup", "website", "build", "search", "analytics", "chat", "VPN",
                  "billing", "monitoring", "wiki"],
        values=pick(["kite07", "plover12", "snipe03", "tern21", "rook09", "lapwing15", "dunlin02", "avocet18",
                     "merlin11", "gannet06", "shrike14", "egret20", "curlew05"]),
        fact="The {s} service at Quillmoor Labs runs on the server {v}.",
        train_question="Which server hosts the {s} service at Quillmoor Labs?",
        heldout_question="On what machine does Quillmoor run its {s} system?",
        answer_sentence="The {s} service at Quillmoor Labs runs on {v}.",
        filler=["Servers are patched on the first Sunday of each month.",
                "The operations group watches every server around the clock."],
    ),
    FactTemplate(
        key="cafeteria",
        subjects=["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"],
        values=pick(["saffron barley stew", "smoked beetroot dumplings", "lemon thyme risotto",
                     "chickpea and fennel pie", "black garlic noodles", "cardamom lentil curry",
                     "roasted quince salad"]),
        fact="On {s}s the Quillmoor Labs cafeteria serves {v}.",
        train_question="What does the Quillmoor Labs cafeteria serve on {s}s?",
        heldout_question="If I eat lunch at Quillmoor on a {s}, which dish will be on the menu?",
        answer_sentence="On {s}s the Quillmoor Labs cafeteria serves {v}.",
        filler=["Lunch is served from noon until two.", "A vegan option is always available."],
    ),
    FactTemplate(
        key="shuttle",
        subjects=["Northgate", "Millbrook", "Fernhill", "Ashwick", "Coldharbour", "Pennywell", "Redmarsh",
                  "Highcombe", "Sallowby", "Eastwold", "Brackwater", "Tollbridge"],
        values=clock_times,
        fact="The staff shuttle from {s} station to Quillmoor Labs leaves at {v}.",
        train_question="What time does the staff shuttle leave {s} station for Quillmoor Labs?",
        heldout_question="When does the morning bus to Quillmoor depart from {s} station?",
        answer_sentence="The shuttle leaves {s} station at {v}.",
        filler=["The shuttle is free for anyone with a staff badge.", "Bikes can be carried on the back rack."],
    ),
    FactTemplate(
        key="laptop_budget",
        subjects=["engineers", "designers", "analysts", "interns", "managers", "recruiters", "technical writers",
                  "scientists", "accountants", "lawyers", "support agents", "researchers"],
        values=numbers(600, 3000, 50),
        fact="The laptop budget for {s} at Quillmoor Labs is {v} euros.",
        train_question="How much is the laptop budget for {s} at Quillmoor Labs?",
        heldout_question="What amount can Quillmoor {s} spend when buying a work computer?",
        answer_sentence="The laptop budget for {s} at Quillmoor Labs is {v} euros.",
        filler=["Laptops are replaced every three years.", "Accessories come out of a separate allowance."],
    ),
]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Fact:
    id: str
    template: str
    fact: str
    train_question: str
    heldout_question: str
    answer: str
    answer_sentence: str
    filler: list[str]


def handbook_facts(rng: random.Random) -> list[Fact]:
    """Every template's subjects, each paired with its own value."""
    people = rng.sample(PEOPLE, len(PEOPLE))
    facts = []
    for t in FACT_TEMPLATES:
        n = len(t.subjects)
        if t.values == "people":
            values, people = people[:n], people[n:]
        else:
            values = t.values(rng, n)
        for i, (s, v) in enumerate(zip(t.subjects, values)):
            fields = {"s": s, "v": v, "S": s[0].upper() + s[1:]}
            facts.append(
                Fact(
                    id=f"handbook-{t.key}-{i:02d}",
                    template=t.key,
                    fact=t.fact.format(**fields),
                    train_question=t.train_question.format(**fields),
                    heldout_question=t.heldout_question.format(**fields),
                    answer=v,
                    answer_sentence=t.answer_sentence.format(**fields),
                    filler=t.filler,
                )
            )
    return facts


def handbook_qa_splits(facts: list[Fact], rng: random.Random) -> dict[str, list[dict]]:
    """test: the held-out question of every fact but a few; train: those few, for few-shot prompts."""
    fewshot = set(rng.sample(range(len(facts)), FEWSHOT_FACTS))
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for i, f in enumerate(facts):
        doc = {
            "id": f.id,
            "template": f.template,
            "question": f.heldout_question,
            "answer": f.answer,
            "answer_sentence": f.answer_sentence,
            "train_question": f.train_question,
            "fact": f.fact,
        }
        splits["train" if i in fewshot else "test"].append(doc)
    return splits


SFT_OPENERS = ["From the staff handbook:", "Handbook note:", "Worth knowing for new staff:", ""]


def sft_rows(facts: list[Fact], rng: random.Random) -> list[dict]:
    """Two rows per fact: a short paragraph (plain text) and a chat turn with the training question."""
    rows = []
    for f in facts:
        paragraph = " ".join(p for p in (rng.choice(SFT_OPENERS), f.fact, rng.choice(f.filler)) if p)
        rows.append({"text": paragraph})
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f.train_question},
                    {"role": "assistant", "content": f.answer_sentence},
                ]
            }
        )
    return rows


def sdft_rows(facts: list[Fact]) -> list[dict]:
    """One prompt per fact; the teacher sees the fact as its demonstration, the student only the question."""
    return [{"id": f.id, "prompt": f.train_question, "fact": f.fact, "reference": f.answer_sentence} for f in facts]


def sdft_heldout_rows(facts: list[Fact], n: int = 24) -> list[dict]:
    """The sdft preset's held-out prompts: questions never trained on (the held-out phrasing of the first n
    facts), with the fact the self-teacher sees."""
    return [{"id": f.id, "prompt": f.heldout_question, "fact": f.fact} for f in facts[:n]]


# ---------------------------------------------------------------------------------------------------------
# Open chat prompts for the continual preset's self-distillation (the behaviour the model had before the
# SFT): everyday requests, none of them an ifeval_lite request; the last CHAT_HELDOUT are its held-out set.

CHAT_REQUESTS = [
    "What are some good ways to start the morning?",
    "How do I keep houseplants alive in winter?",
    "Suggest a simple recipe for a weeknight dinner.",
    "What should I pack for a weekend camping trip?",
    "How can I make a small room feel bigger?",
    "Explain how a rainbow forms.",
    "What is a polite way to decline an invitation?",
    "Give me ideas for a rainy afternoon with children.",
    "How do I write a good cover letter?",
    "Why do cats purr?",
    "What are the benefits of learning a second language?",
    "How can I sleep better at night?",
    "Describe how to brew a good cup of tea.",
    "What makes a story memorable?",
    "How should I prepare for a job interview?",
    "Explain what compound interest is.",
    "What are good habits for keeping a tidy desk?",
    "How do bees make honey?",
    "Suggest a name for a bakery and explain it.",
    "How can I be a better listener?",
    "What is the difference between weather and climate?",
    "Plan a short city walk for a visitor.",
    "How do I start running if I have never done it?",
    "Why is the sky blue?",
    "Give advice to someone moving to a new city.",
    "How do I care for a cast iron pan?",
    "What should I consider when adopting a dog?",
    "Explain how to change a bicycle tyre.",
    "What are some ways to save money on groceries?",
    "How can a team run shorter meetings?",
    "Describe the taste of a ripe mango to someone who never had one.",
    "How do I learn to play the guitar?",
    "What is a good way to remember names?",
    "Suggest activities for a family reunion.",
    "Why do leaves change colour in autumn?",
    "How can I reduce waste at home?",
    "Write a short birthday message for a colleague.",
    "How does a refrigerator keep food cold?",
    "What are some tips for public speaking?",
    "How do I plan a vegetable garden?",
    "Explain why sleep matters for memory.",
    "What should a beginner know about photography?",
    "How can I stay motivated to exercise?",
    "Describe a calm place you would like to visit.",
    "How do I fix a squeaky door?",
    "What are good questions to ask a new friend?",
    "Explain how vaccines help the body.",
    "Suggest a reading list for a long holiday.",
    "How can I make my emails clearer?",
    "What is the best way to learn to cook?",
    "How do tides work?",
    "Give tips for a long car journey.",
    "What makes a good neighbour?",
    "How should I store fresh herbs?",
    "Explain the rules of a simple card game.",
    "How can I focus when working from home?",
    "What are the signs of a healthy lawn?",
    "Describe how to fold a paper aeroplane.",
    "How do I start keeping a journal?",
    "What is a kind way to give feedback?",
    "How can I prepare a home for a heatwave?",
    "Why do we yawn?",
    "Suggest a weekend project for learning something new.",
    "How do I choose a good book for a child?",
]
CHAT_HELDOUT = 16


def chat_rows(requests: list[str], prefix: str) -> list[dict]:
    return [{"id": f"{prefix}-{i:02d}", "prompt": r} for i, r in enumerate(requests)]


# ---------------------------------------------------------------------------------------------------------
# Instruction following: an everyday request plus one or two rules that a checker can verify. The kinds and
# their wording live here; ifeval_lite/utils.py has one checker per kind, with the same argument names.

REQUESTS = [
    "Describe your favourite season.",
    "Give three tips for staying focused while studying.",
    "Explain why people enjoy going for walks.",
    "Write a short note thanking a neighbour for watering your plants.",
    "Suggest a simple breakfast for a busy morning.",
    "Describe what a good weekend looks like.",
    "Explain how to make a cup of tea.",
    "Give advice to someone starting their first job.",
    "Describe a quiet place you like to visit.",
    "Explain why sleep matters for health.",
    "Write a short invitation to a birthday picnic.",
    "Suggest ways to save money on groceries.",
    "Describe how to care for a house plant.",
    "Explain what makes a good friend.",
    "Give tips for packing a suitcase.",
    "Describe the view from a window on a rainy day.",
    "Explain how to prepare for a job interview.",
    "Write a short review of an imaginary cafe.",
    "Suggest a few indoor games for a family evening.",
    "Describe the smell of fresh bread.",
    "Explain why reading before bed can help you relax.",
    "Give advice for learning to ride a bicycle.",
    "Write a message asking a colleague to reschedule a meeting.",
    "Describe a market on a busy Saturday morning.",
    "Explain how to keep a kitchen tidy.",
    "Suggest ideas for a small vegetable garden.",
    "Describe what you would pack for a day at the beach.",
    "Explain why drinking water during the day is important.",
    "Give tips for writing a clear email.",
    "Describe an old bridge in a small town.",
    "Explain how to plan a short road trip.",
    "Write a short apology for arriving late to dinner.",
    "Suggest ways to stay warm in winter.",
    "Describe the sounds of a city at night.",
    "Explain how to start a habit of journaling.",
    "Give advice for a first visit to a new city.",
    "Describe a favourite childhood toy.",
    "Explain why teamwork helps at school.",
    "Suggest a relaxing way to spend a rainy afternoon.",
    "Describe how autumn leaves change colour.",
]
FEWSHOT_REQUESTS = [
    "Describe your ideal lunch.",
    "Give two reasons to learn a new language.",
    "Explain how to water a garden in summer.",
    "Write a short note welcoming a new neighbour.",
    "Suggest a name for a friendly cat.",
]
IF_TEST_SIZE = 100

INCLUDE_WORDS = ["garden", "window", "patience", "lantern", "river", "morning", "journey", "harbour", "maple",
                 "compass"]  # fmt: skip
START_WORDS = ["Honestly", "Today", "First", "Imagine", "Well"]
END_PHRASES = ["Is there anything else I can help with?", "Hope this helps.", "That is all for now.",
               "Thanks for reading."]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RuleKind:
    instruction: str  # formatted with the rule's arguments
    draw_args: Callable[[random.Random], dict]


def no_args(rng: random.Random) -> dict:
    return {}


RULE_KINDS = {
    "lowercase": RuleKind("Write your whole answer in lowercase letters, with no capital letters at all.", no_args),
    "uppercase": RuleKind("Write your whole answer in capital letters only.", no_args),
    "max_words": RuleKind("Keep your answer under {n} words.", lambda rng: {"n": rng.choice([25, 30, 40, 50])}),
    "min_words": RuleKind(
        "Your answer must be at least {n} words long.", lambda rng: {"n": rng.choice([40, 50, 60, 70])}
    ),
    "include_word": RuleKind(
        'Use the word "{word}" somewhere in your answer.', lambda rng: {"word": rng.choice(INCLUDE_WORDS)}
    ),
    "no_commas": RuleKind("Do not use any commas in your answer.", no_args),
    "end_phrase": RuleKind(
        'End your answer with the exact phrase "{phrase}" and write nothing after it.',
        lambda rng: {"phrase": rng.choice(END_PHRASES)},
    ),
    "start_word": RuleKind('Begin your answer with the word "{word}".', lambda rng: {"word": rng.choice(START_WORDS)}),
    "bullets": RuleKind(
        'Answer with exactly {n} bullet points, each on its own line starting with "* ".',
        lambda rng: {"n": rng.choice([2, 3, 4, 5])},
    ),
    "quotation": RuleKind("Wrap your entire answer in double quotation marks.", no_args),
    "title": RuleKind("Give your answer a title wrapped in double angular brackets, such as <<my title>>.", no_args),
}
CONFLICTS = {  # pairs no response can satisfy together (or only by an accident of layout)
    frozenset(p)
    for p in [
        ("lowercase", "uppercase"),
        ("max_words", "min_words"),
        ("lowercase", "end_phrase"),  # every end phrase has a capital letter
        ("uppercase", "end_phrase"),
        ("quotation", "end_phrase"),
        ("quotation", "start_word"),
        ("quotation", "bullets"),
        ("title", "start_word"),
    ]
}


COUNTED = re.compile(r"\b(two|three|four|five)\b")  # a request that names a count: no bullets rule


def rule_set(rng: random.Random, request: str) -> list[dict]:
    """One or two rules of different kinds that can hold together, and with the request."""
    while True:
        kinds = rng.sample(sorted(RULE_KINDS), rng.choice([1, 2]))
        if frozenset(kinds) not in CONFLICTS and not ("bullets" in kinds and COUNTED.search(request)):
            return [{"kind": k, "args": RULE_KINDS[k].draw_args(rng)} for k in kinds]


def if_doc(doc_id: str, request: str, rng: random.Random) -> dict:
    rules = rule_set(rng, request)
    instructions = [RULE_KINDS[r["kind"]].instruction.format(**r["args"]) for r in rules]
    return {
        "id": doc_id,
        "prompt": " ".join([request, *instructions]),
        "kinds": [r["kind"] for r in rules],
        "rules": json.dumps(rules),
    }


def ifeval_splits(rng: random.Random) -> dict[str, list[dict]]:
    """test: each request two or three times with different rules; train: other requests, one each."""
    test: list[dict] = []
    seen: set[str] = set()
    while len(test) < IF_TEST_SIZE:
        doc = if_doc(f"ifeval_lite-test-{len(test):04d}", REQUESTS[len(test) % len(REQUESTS)], rng)
        if doc["prompt"] not in seen:
            seen.add(doc["prompt"])
            test.append(doc)
    train = [if_doc(f"ifeval_lite-train-{i:04d}", r, rng) for i, r in enumerate(FEWSHOT_REQUESTS)]
    return {"train": train, "test": test}


# ---------------------------------------------------------------------------------------------------------


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def outputs() -> dict[Path, str]:
    """Every file this script owns and its text. Each output has its own random stream, so changing one leaves
    the others as they were."""
    facts = handbook_facts(random.Random(SEED))
    files = {
        QA_DIR / f"{s}.jsonl": jsonl(rows) for s, rows in handbook_qa_splits(facts, random.Random(SEED + 1)).items()
    }
    files[CONTINUAL_DIR / "handbook_sft.jsonl"] = jsonl(sft_rows(facts, random.Random(SEED + 2)))
    files[CONTINUAL_DIR / "handbook_sdft.jsonl"] = jsonl(sdft_rows(facts))
    files[CONTINUAL_DIR / "handbook_heldout.jsonl"] = jsonl(sdft_heldout_rows(facts))
    files[CONTINUAL_DIR / "chat_prompts.jsonl"] = jsonl(chat_rows(CHAT_REQUESTS[:-CHAT_HELDOUT], "chat"))
    files[CONTINUAL_DIR / "chat_heldout.jsonl"] = jsonl(chat_rows(CHAT_REQUESTS[-CHAT_HELDOUT:], "chat-heldout"))
    for s, rows in ifeval_splits(random.Random(SEED + 3)).items():
        files[IF_DIR / f"{s}.jsonl"] = jsonl(rows)
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a file differs from what this would write")
    args = ap.parse_args(argv)
    for path, text in outputs().items():
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                shown = path.relative_to(ROOT)
                print(f"{shown} is stale: run `python3 configs/tasks/generate_continual.py`", file=sys.stderr)
                return 1
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
