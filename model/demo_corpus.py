"""The demo model's training text: factory shop-floor records, written by a seeded grammar.

Rule: the corpus is a pure function of (seed, count, material): the same arguments give the same
documents on every machine and Python version (only `random.Random` with an explicit seed, no
set or dict ordering, no clock). Nothing is copied from anywhere: every document is assembled
here from the word lists below. Records keep their own logic so a model must learn structure,
not just words: a torque check passes only when every reading lies within tolerance of the
target, a temperature check reads "within limits" only when the reading is near the setpoint,
a work order's priority follows its fault, a handover's part counts add up.

Two materials: `"plant"` (lines 1-6, conveyors A-F: the v1 model) and `"line7"` (the new
battery-module line 7, its stations, units and faults: what demo v2 is fine-tuned on).
`split` divides documents into train and held-out by index, so held-out documents are never
seen in training.

About a quarter of the documents (a seeded draw per document, so train and held-out get the same
share) are chat exchanges in the checkpoint's ChatML template: an operator asks for the record
in words (`request_of`: its kind, line, station, fault), sometimes under a system message, and
the assistant's turn is the record itself, ending in `<|im_end|>`. So the model learns to answer
in a chat as well as to continue a record.
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable

MATERIALS = ("plant", "line7")
DOCUMENT_SEPARATOR = "\n\n"
CHAT_SHARE = 0.25
SYSTEM_MESSAGE = "You are the shift assistant of the plant. Answer with the record asked for."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # as model.demo_tokenizer's special tokens 1 and 2

OPERATORS = ("Keller", "Mendes", "Okafor", "Lindqvist", "Haddad", "Novak", "Tanaka", "Brenner", "Ruiz",
             "Petrov", "Adeyemi", "Castillo", "Moreau", "Jansen", "Kowalski", "Sato")
SHIFTS = ("early", "late", "night")
LINES = ("1", "2", "3", "4", "5", "6")
CONVEYORS = ("A", "B", "C", "D", "E", "F")
STATIONS = {  # station kind -> what it makes
    "press": "brackets", "welder": "frames", "paint booth": "panels", "CNC mill": "housings",
    "assembly cell": "gearboxes", "packing station": "cartons",
}
TOOLS = ("nutrunner", "torque wrench", "screwdriver", "impact driver")
OVENS = ("Oven 1", "Oven 2", "Oven 3", "Curing oven", "Drying tunnel")
FAULTS = {  # fault -> (priority, part)
    "motor bearing noise": ("high", "bearing 6204"),
    "belt slipping": ("medium", "drive belt"),
    "hydraulic leak": ("high", "seal kit"),
    "sensor misaligned": ("low", "sensor bracket"),
    "coolant level low": ("low", "coolant"),
    "air pressure drop": ("medium", "pressure regulator"),
    "emergency stop tripped": ("high", "safety relay"),
    "worn cutting tool": ("medium", "end mill"),
}
TEAMS = ("maintenance team 1", "maintenance team 2", "electrical team", "hydraulics team")

# line 7: the new battery-module line (demo v2's material)
L7_STATIONS = {"cell stacker": "cell stacks", "laser welder": "busbar welds", "module tester": "modules",
               "glue dispenser": "bonded trays", "end-of-line tester": "battery packs"}
L7_FAULTS = {
    "laser power drift": ("high", "laser optics"),
    "cell voltage mismatch": ("high", "cell sorting fixture"),
    "glue nozzle clogged": ("medium", "glue nozzle"),
    "gripper vacuum low": ("medium", "vacuum cup"),
    "insulation test failure": ("high", "test probe"),
}


def _when(r: random.Random) -> str:
    return f"2026-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}"


def _clock(r: random.Random) -> str:
    return f"{r.choice((6, 7, 8, 10, 12, 14, 15, 18, 20, 22)):02d}:{r.choice((0, 15, 30, 45)):02d}"


def _station(r: random.Random, stations: dict[str, str]) -> tuple[str, str]:
    kind = r.choice(list(stations))
    return f"S{r.randint(1, 12)} {kind}", stations[kind]


def _handover(r: random.Random, line: str, stations: dict[str, str]) -> str:
    out, inc = r.sample(OPERATORS, 2)
    shift = r.choice(SHIFTS)
    lines = [f"Shift handover notes: Line {line}, {shift} shift, {_when(r)}.",
             f"Outgoing: {out}. Incoming: {inc}."]
    total = 0
    for _ in range(r.randint(2, 3)):
        name, product = _station(r, stations)
        made, rejects = r.randint(120, 980), r.randint(0, 9)
        total += made
        state = "running" if rejects < 6 else "running with rejects"
        lines.append(f"Station {name}: {state}, {made} {product}, {rejects} rejects.")
    lines.append(f"Total output: {total} parts." if r.random() < 0.5 else f"Total output this shift: {total} parts.")
    lines.append(r.choice(("No open issues.", "Open issue handed over: check the reject bin.",
                           "Open issue handed over: material low at the first station.")))
    return "\n".join(lines)


def _torque(r: random.Random, line: str, stations: dict[str, str]) -> str:
    name, _ = _station(r, stations)
    target = r.choice((4.5, 8.0, 12.5, 18.0, 25.0, 40.0))
    tol = 0.5 if target < 20 else 1.0
    readings = [round(target + r.uniform(-1.3, 1.3) * tol, 1) for _ in range(3)]
    ok = all(abs(v - target) <= tol for v in readings)
    result = "pass" if ok else "fail, tool sent for calibration"
    return (f"Line {line} torque check: station {name}, {r.choice(TOOLS)} T-{r.randint(10, 99)}, "
            f"target {target} Nm, tolerance {tol} Nm.\n"
            f"Readings: {readings[0]} Nm, {readings[1]} Nm, {readings[2]} Nm.\n"
            f"Result: {result}. Checked by {r.choice(OPERATORS)} at {_clock(r)}.")


def _temperature(r: random.Random, line: str, stations: dict[str, str]) -> str:
    oven = r.choice(OVENS)
    zones = []
    for zone in range(1, r.randint(2, 4) + 1):
        setpoint = r.choice((160, 180, 200, 220, 240))
        reading = setpoint + r.randint(-12, 12)
        verdict = "within limits" if abs(reading - setpoint) <= 8 else "out of limits"
        zones.append(f"Zone {zone}: setpoint {setpoint} C, reading {reading} C, {verdict}.")
    return "\n".join([f"{oven} temperature check, Line {line}, {_when(r)} {_clock(r)}:", *zones,
                      f"Recorded by {r.choice(OPERATORS)}."])


def _work_order(r: random.Random, line: str, stations: dict[str, str], faults: dict[str, tuple[str, str]]) -> str:
    name, _ = _station(r, stations)
    fault = r.choice(list(faults))
    priority, part = faults[fault]
    status = r.choice(("open", "in progress", "closed"))
    lines = [f"Work order WO-{r.randint(10000, 99999)}: Line {line}, station {name}, {fault}.",
             f"Priority: {priority}. Assigned to: {r.choice(TEAMS)}.",
             f"Parts: {part}, {r.randint(1, 4)} pcs. Status: {status}."]
    if status == "closed":
        lines.append(f"Downtime: {r.randint(5, 180)} min. Closed by {r.choice(OPERATORS)} at {_clock(r)}.")
    return "\n".join(lines)


def _status(r: random.Random, line: str, stations: dict[str, str]) -> str:
    conveyor = r.choice(CONVEYORS)
    speed = r.choice(("0.8", "1.0", "1.2", "1.5"))
    load = r.randint(40, 98)
    faults = r.choice((0, 0, 0, 1, 2))
    since = _clock(r)
    tail = f"no faults since {since}." if faults == 0 else f"{faults} faults since {since}, see the work orders."
    return (f"Conveyor {conveyor} status report: Line {line}, running at {speed} m/s, load {load} %, {tail}\n"
            f"Next inspection: {_when(r)}.")


def _line7_cells(r: random.Random) -> str:
    name, _ = _station(r, L7_STATIONS)
    volts = [round(r.uniform(3.58, 3.72), 2) for _ in range(4)]
    spread = round(max(volts) - min(volts), 2)
    verdict = "accepted" if spread <= 0.08 else "rejected, cells resorted"
    return (f"Line 7 cell voltage check: station {name}, module M-{r.randint(1000, 9999)}.\n"
            f"Cell voltages: {volts[0]} V, {volts[1]} V, {volts[2]} V, {volts[3]} V. Spread {spread} V.\n"
            f"Result: {verdict}. Checked by {r.choice(OPERATORS)} at {_clock(r)}.")


def _line7_insulation(r: random.Random) -> str:
    resistance = r.choice((50, 120, 250, 400, 600, 900))
    verdict = "pass" if resistance >= 100 else "fail, module quarantined"
    return (f"Line 7 insulation test: end-of-line tester, pack P-{r.randint(1000, 9999)}, "
            f"test voltage {r.choice((500, 1000))} V.\n"
            f"Insulation resistance: {resistance} MOhm, minimum 100 MOhm. Result: {verdict}.")


def _line7_weld(r: random.Random) -> str:
    power = r.choice((1.8, 2.0, 2.2, 2.4))
    measured = round(power + r.uniform(-0.15, 0.15), 2)
    verdict = "within limits" if abs(measured - power) <= 0.1 else "out of limits, optics cleaned"
    return (f"Line 7 laser welder check: station S{r.randint(1, 6)} laser welder, setpoint {power} kW, "
            f"measured {measured} kW, {verdict}.\nWeld seams inspected: {r.randint(20, 60)}, "
            f"porosity found: {r.randint(0, 3)}.")


_PLANT: tuple[Callable, ...] = (_handover, _torque, _temperature, _status)


def document(r: random.Random, material: str = "plant") -> str:
    """One record of the given material, drawn from `r`."""
    if material == "plant":
        line = r.choice(LINES)
        kind = r.randrange(5)
        if kind == 4:
            return _work_order(r, line, STATIONS, FAULTS)
        return _PLANT[kind](r, line, STATIONS)
    if material == "line7":
        kind = r.randrange(6)
        if kind == 0:
            return _handover(r, "7", L7_STATIONS)
        if kind == 1:
            return _work_order(r, "7", L7_STATIONS, L7_FAULTS)
        return (_line7_cells, _line7_insulation, _line7_weld, _line7_cells)[kind - 2](r)
    raise ValueError(f"material {material!r}: expected one of {', '.join(MATERIALS)}")


def documents(seed: int, count: int, material: str = "plant") -> list[str]:
    """`count` documents; document i depends only on (seed, material, i). A CHAT_SHARE of them
    are chat exchanges asking for the record."""
    out = []
    for i in range(count):
        record = document(random.Random(f"{seed}:{material}:{i}"), material)
        draw = random.Random(f"{seed}:{material}:{i}:chat")
        out.append(chat_exchange(record, system=draw.random() < 0.3) if draw.random() < CHAT_SHARE else record)
    return out


# (pattern of a record's first line, the request that asks for it); the first match wins
_REQUESTS = (
    (r"^Line (\d+) torque check: station (S\d+ [^,]+),", "Write the torque check record for Line {0}, station {1}."),
    (r"^Shift handover notes: Line (\d+), (\w+) shift", "Draft the {1} shift handover notes for Line {0}."),
    (r"^Conveyor (\w) status report: Line (\d+),", "Give me the status report of conveyor {0} on Line {1}."),
    (r"^(.+) temperature check, Line (\d+),", "Log a temperature check of {0} on Line {1}."),
    (r"^Work order WO-\d+: Line (\d+), station (S\d+ [^,]+), (.+)\.$", "Open a work order for {2} at Line {0}, station {1}."),
    (r"^Line 7 cell voltage check: station (S\d+ [^,]+),", "Write the cell voltage check for Line 7, station {0}."),
    (r"^Line 7 insulation test: ", "Record an insulation test on Line 7."),
    (r"^Line 7 laser welder check: station (S\d+) ", "Write the laser welder check for Line 7, station {0}."),
)


def request_of(record: str) -> str:
    """The words an operator would use to ask for `record` (its kind, line, station, fault)."""
    first = record.split("\n", 1)[0]
    for pattern, request in _REQUESTS:
        if m := re.match(pattern, first):
            return request.format(*m.groups())
    raise ValueError(f"no request matches the record {first!r}")


def chat_exchange(record: str, system: bool = False) -> str:
    """`record` as the assistant's answer to its request, in the ChatML template."""
    turns = ([("system", SYSTEM_MESSAGE)] if system else []) + [("user", request_of(record)), ("assistant", record)]
    return "".join(f"{IM_START}{role}\n{text}{IM_END}\n" for role, text in turns)


def plain_text(doc: str) -> str:
    """`doc` without its chat markers (what a tokenizer is trained on: special tokens are not text)."""
    return re.sub(r"<\|im_(start|end)\|>", "", doc)


def split(docs: list[str], heldout_every: int = 10) -> tuple[list[str], list[str]]:
    """(train, held-out): every `heldout_every`-th document is held out."""
    train = [d for i, d in enumerate(docs) if i % heldout_every]
    heldout = [d for i, d in enumerate(docs) if not i % heldout_every]
    return train, heldout


RECORD_KINDS = ("torque check", "Shift handover notes", "status report", "temperature check", "Work order")


def is_chat(doc: str) -> bool:
    return doc.startswith(IM_START)


def record_of(doc: str) -> str:
    """The record a document holds: itself, or a chat exchange's answer."""
    return doc.split(f"{IM_START}assistant\n", 1)[1].removesuffix(f"{IM_END}\n") if is_chat(doc) else doc


def record_kind(doc: str) -> str | None:
    """Which of RECORD_KINDS a plant document's record is (by its first line)."""
    first = record_of(doc).split("\n", 1)[0]
    return next((k for k in RECORD_KINDS if k in first), None)


def prompt_of(doc: str) -> str:
    """The start of a record a model should be able to continue: its text up to the first ':'
    that ends a label (followed by a space or a line break, so a clock time does not count)."""
    for i, c in enumerate(doc[:-1]):
        if c == ":" and doc[i + 1] in " \n":
            return doc[:i + 1]
    return doc
