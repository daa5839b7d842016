"""lpd.py's layout as a contract: numbered chapters in dependency order, each saying what
it provides, none past its size budget, no dead names. Reads lpd.py's text and parses it
with `ast`; imports nothing from it, needs no root and takes about a second.

The rules, as the checks below apply them:

- **Chapters.** A banner is a line `# N Title ####` (a chapter) or `# N.M Title ####`
  (a sub-chapter): the number, one space, the title, one space, four or more '#'.
  Chapters are numbered 1, 2, ... and a chapter's sub-chapters N.1, N.2, ... in file
  order. The module docstring's index (the indented lines after the line starting
  "Chapters") lists exactly the banners' numbers and titles, in order.
- **Regions.** A banner heads its *own region*: the lines up to the next banner of any
  level. A chapter's *span* is its own region plus its sub-chapters'. The lines before
  the first banner (docstring, imports, version) are the preamble, usable everywhere.
- **Order.** A top-level name is one bound at module level by a def, a class or an
  assignment (its first binding counts). A load of it (a Python name lookup that
  resolves to the module's global, found by tracking every scope's own bindings) in
  region R must come from a region defining it no later than R. Inside R itself a
  load must follow the definition, unless it sits in the body of a function or lambda
  (which runs later, when called): default values, decorators, annotations, class
  bodies and comprehensions outside a function run at import and count as module level.
  Sub-chapters are regions of their own: 7.5 may not use what 7.7 defines, even in a
  function body.
- **provides.** The line right after a banner (after the rule line under a chapter's
  banner) is `# provides: a, b, PREFIX*, ...`; `PREFIX*` names every top-level name of
  the span that starts with PREFIX, and a line ending in ',' goes on on the next, which
  starts `#   ` (so a long list stays within lpd.py's ~100 columns). It lists what the text the banner heads gives to
  later text: for a sub-chapter, or a chapter without sub-chapters, every top-level name
  it defines that a later region uses; for a chapter with sub-chapters, every name of
  its span that a later chapter uses, plus what its own lines before the first
  sub-chapter give its sub-chapters. Every entry must name something that exists at top
  level in the span (test_provides_names_exist) and the list must be exactly that, no
  name missing and none that nothing later uses (test_provides_is_what_later_chapters_use).
  A chapter that gives nothing says `# provides: -`.
- **Size.** See LEAF_BUDGET and CHAPTER_BUDGET.
- **Dead names.** Every top-level name is loaded somewhere in lpd.py outside its own
  definition (a `globals()["name"]` lookup counts), or appears as a word in a file under
  tests/ (other than this one), or is in ALLOWED_UNUSED with its reason.
- **Undefined names.** Every global load resolves to a top-level name, an import, a
  builtin or a module attribute (`__name__`, ...): a merge that drops a definition some
  new code still uses fails here, without pyflakes.

Each check is a function from a Layout to a list of problems (strings naming the
offender); the test_*_catches_* tests run each on a small synthetic module that breaks
its rule, so a check that stopped finding anything would fail too.
"""
import ast
import bisect
import builtins
import collections
import os
import re

import pytest

pytestmark = pytest.mark.unit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LPD = os.path.join(ROOT, "lpd.py")
TESTS = os.path.join(ROOT, "tests")

# Size budgets, in lines (banner to the next banner). A sub-chapter, or a chapter without
# sub-chapters, is one subject read in one sitting. The largest, 7.4 Code generator
# (~1,240 lines), is gencode.c's state and generators as one class, with no cut that would
# not split a family of generators apart (the next, 13.3 Programs, is ~1,080); the budget
# is that with a little room, a tripwire rather than a target: a leaf that grows past it
# is split into sub-chapters (or the budget raised here, with the reason). A chapter with
# sub-chapters may be larger: the filter compiler is libpcap's five files (~2,860 lines,
# complete against libpcap 1.10, not growing), the next largest the eBPF engine (~2,180);
# past 3,000 a chapter is a second module inside the first and should be two chapters.
LEAF_BUDGET = 1300
CHAPTER_BUDGET = 3000

# Top-level names nothing uses that stay, and why. Only kernel ABI tables belong here: a
# row of an encoding whose siblings are used, kept so the table reads against the kernel
# header it copies (a hole would look like a mistake).
ALLOWED_UNUSED = {
    "EBPF_MEMSX": "bpf.h's mode table (BPF_IMM ... BPF_ATOMIC): sign-extending loads",
    "EBPF_TO_LE": "BPF_END's source bit, the pair of EBPF_TO_BE",
    "EBPF_FETCH": "bpf.h's atomic modifier beside the BPF_ATOMIC mode lpd uses",
}

BANNER = re.compile(r"^# (\d+(?:\.\d+)?) (\S.*?) #{4,}$")
RULE = re.compile(r"^#{10,}$")
PROVIDES = re.compile(r"^# provides: (.+)$")
CONTINUED = "#   "               # a provides line ending in ',' goes on on the next line
INDEX_HEAD = "Chapters"
INDEX_LINE = re.compile(r"^\s+(\d+(?:\.\d+)?) (\S.*)$")
MODULE_NAMES = set(dir(builtins)) | {"__name__", "__file__", "__doc__", "__spec__",
                                     "__builtins__", "__loader__", "__package__"}


class Chapter:
    """One banner: its number, title, provides entries (None: no provides line) and
    lines (1-based): banner, own region's last line, span's last line."""

    def __init__(self, number, title, line):
        self.number, self.title, self.line = number, title, line
        self.provides, self.own_end, self.end = None, None, None
        self.sub = "." in number

    def __str__(self):
        return f"{self.number} {self.title}"


class Definition:
    def __init__(self, name, line, end):
        self.name, self.line, self.end = name, line, end


Use = collections.namedtuple("Use", "name line deferred")


def parse_chapters(lines):
    chapters = []
    for i, line in enumerate(lines):
        m = BANNER.match(line)
        if not m:
            continue
        ch = Chapter(m.group(1), m.group(2), i + 1)
        nxt = i + 1
        if not ch.sub and nxt < len(lines) and RULE.match(lines[nxt]):
            nxt += 1
        m = PROVIDES.match(lines[nxt]) if nxt < len(lines) else None
        if m:
            listed = m.group(1).strip()
            while listed.endswith(",") and nxt + 1 < len(lines) and \
                    lines[nxt + 1].startswith(CONTINUED):
                nxt += 1
                listed += " " + lines[nxt][len(CONTINUED):].strip()
            entries = [e.strip() for e in listed.split(",")]
            ch.provides = [] if entries == ["-"] else entries
        chapters.append(ch)
    for i, ch in enumerate(chapters):
        ch.own_end = chapters[i + 1].line - 1 if i + 1 < len(chapters) else len(lines)
        ch.end = len(lines)
        for later in chapters[i + 1:]:
            if not later.sub or ch.sub:
                ch.end = later.line - 1
                break
    return chapters


def parse_index(docstring):
    """(number, title) of each line of the docstring's chapter index."""
    lines = (docstring or "").splitlines()
    for i, line in enumerate(lines):
        if line.startswith(INDEX_HEAD):
            break
    else:
        return []
    # The heading may wrap; the index is the indented numbered lines that follow.
    index, started = [], False
    for line in lines[i + 1:]:
        m = INDEX_LINE.match(line)
        if m:
            index.append((m.group(1), m.group(2)))
            started = True
        elif started or not line.strip():
            if started:
                break
    return index


def _targets(node):
    if isinstance(node, ast.Name):
        yield node.id
    elif isinstance(node, (ast.Tuple, ast.List)):
        for element in node.elts:
            yield from _targets(element)
    elif isinstance(node, ast.Starred):
        yield from _targets(node.value)


def top_level_definitions(tree):
    """name -> Definition (its first binding) of every def, class and assignment at
    module level."""
    defs = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [n for target in node.targets for n in _targets(target)]
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            names = list(_targets(node.target))
        else:
            continue
        for name in names:
            defs.setdefault(name, Definition(name, node.lineno, node.end_lineno))
    return defs


def other_bindings(tree):
    """Module-level names bound by imports and loop targets (not top-level definitions:
    nothing else may use them from another chapter, nor is any dead)."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            names.update(_targets(node.target))
    return names


_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _bound(scope):
    """The names a function, lambda, class or comprehension binds itself (parameters,
    assignment targets, imports, nested defs, except-as), minus those it declares
    global. Nested scopes' bindings are theirs, not this one's."""
    names, declared_global = set(), set()
    if isinstance(scope, _FUNCTIONS):
        a = scope.args
        names.update(x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg]
                     if x is not None)
        todo = list(scope.body) if isinstance(scope.body, list) else [scope.body]
    elif isinstance(scope, ast.ClassDef):
        todo = list(scope.body)
    else:
        todo = [g.target for g in scope.generators]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            continue
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        elif isinstance(node, ast.Global):
            declared_global.update(node.names)
        elif isinstance(node, ast.NamedExpr):
            names.add(node.target.id)
        if isinstance(node, (ast.Lambda,) + _COMPREHENSIONS):
            continue
        todo.extend(ast.iter_child_nodes(node))
    return names - declared_global


def global_loads(tree):
    """Every load that resolves to a module-level name, as Use(name, line, deferred):
    deferred when it sits in a function's or lambda's body."""
    uses = []

    def visit(node, chain, deferred):
        # chain: the enclosing scopes, innermost last, as (is_class, bound names).
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            for depth, (is_class, bound) in enumerate(reversed(chain)):
                if is_class and depth > 0:
                    continue        # a class body's names are not seen by its methods
                if node.id in bound:
                    return
            uses.append(Use(node.id, node.lineno, deferred))
            return
        if isinstance(node, _FUNCTIONS):
            a = node.args
            now = list(a.defaults) + [d for d in a.kw_defaults if d is not None]
            if not isinstance(node, ast.Lambda):
                now += node.decorator_list + [node.returns] + [
                    x.annotation for x in a.posonlyargs + a.args + a.kwonlyargs
                    + [a.vararg, a.kwarg] if x is not None]
            for child in now:
                if child is not None:
                    visit(child, chain, deferred)
            inner = chain + [(False, _bound(node))]
            for child in node.body if isinstance(node.body, list) else [node.body]:
                visit(child, inner, True)
            return
        if isinstance(node, ast.ClassDef):
            for child in node.decorator_list + node.bases + node.keywords:
                visit(child, chain, deferred)
            inner = chain + [(True, _bound(node))]
            for child in node.body:
                visit(child, inner, deferred)
            return
        if isinstance(node, _COMPREHENSIONS):
            first = node.generators[0]
            visit(first.iter, chain, deferred)      # evaluated in the enclosing scope
            inner = chain + [(False, _bound(node))]
            for child in ast.iter_child_nodes(node):
                if child is not first:
                    visit(child, inner, deferred)
            for child in [first.target] + first.ifs:
                visit(child, inner, deferred)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, chain, deferred)

    visit(tree, [], False)
    return uses


class Layout:
    """lpd.py (or a synthetic module) as the checks see it. tests_text: the text of the
    files under tests/ other than this one, for the dead-name check."""

    def __init__(self, text, tests_text=""):
        self.lines = text.splitlines()
        self.tree = ast.parse(text)
        self.chapters = parse_chapters(self.lines)
        self.starts = [ch.line for ch in self.chapters]
        self.defs = top_level_definitions(self.tree)
        self.others = other_bindings(self.tree)
        self.uses = global_loads(self.tree)
        self.index = parse_index(ast.get_docstring(self.tree))
        self.tests_text = tests_text
        self.lookups = set(re.findall(r"""globals\(\)\[["'](\w+)["']\]""", text))

    def region(self, line):
        """Index of the chapter whose own region holds `line`; -1 for the preamble."""
        return bisect.bisect_right(self.starts, line) - 1

    def name_of(self, region):
        return "the preamble" if region < 0 else str(self.chapters[region])

    def top(self, region):
        """Index of the (top-level) chapter a region belongs to."""
        while region >= 0 and self.chapters[region].sub:
            region -= 1
        return region

    def has_subs(self, i):
        ch = self.chapters[i]
        return not ch.sub and i + 1 < len(self.chapters) and self.chapters[i + 1].sub

    def later_regions(self, name):
        """The regions after the one defining `name` that use it."""
        d = self.region(self.defs[name].line)
        return {r for r in (self.region(u.line) for u in self.uses if u.name == name) if r > d}


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def lpd_layout():
    texts = []
    for folder, _, files in os.walk(TESTS):
        for f in sorted(files):
            path = os.path.join(folder, f)
            if f.endswith(".py") and os.path.abspath(path) != os.path.abspath(__file__):
                texts.append(_read(path))
    return Layout(_read(LPD), "\n".join(texts))


# -- the checks ------------------------------------------------------------------------

def check_numbering(layout):
    problems, chapter, sub = [], 0, 0
    for ch in layout.chapters:
        if ch.sub:
            expected = f"{chapter}.{sub + 1}"
            sub += 1
        else:
            expected = str(chapter + 1)
            chapter, sub = chapter + 1, 0
        if ch.number != expected:
            problems.append(f"line {ch.line}: banner {ch} should be numbered {expected}")
    if not layout.chapters:
        problems.append("no chapter banners found ('# N Title ####')")
    return problems


def check_index(layout):
    banners = [(ch.number, ch.title) for ch in layout.chapters]
    if layout.index == banners:
        return []
    problems = []
    index = set(layout.index)
    for entry in banners:
        if entry not in index:
            problems.append(f"banner '{entry[0]} {entry[1]}' is missing from the docstring's index")
    for entry in layout.index:
        if entry not in set(banners):
            problems.append(f"docstring index line '{entry[0]} {entry[1]}' has no banner")
    if not problems:
        problems.append("the docstring's index lists the banners in another order")
    return problems


def check_order(layout):
    problems = set()
    for use in layout.uses:
        d = layout.defs.get(use.name)
        if d is None:
            continue
        where, home = layout.region(use.line), layout.region(d.line)
        if home > where:
            problems.add(f"{use.name} is used in {layout.name_of(where)} (line {use.line}) "
                         f"but defined later, in {layout.name_of(home)} (line {d.line})")
        elif home == where and not use.deferred and use.line < d.line:
            problems.add(f"{use.name} is used at import time on line {use.line} of "
                         f"{layout.name_of(where)}, before its definition on line {d.line}")
    return sorted(problems)


def check_sizes(layout, leaf_budget=LEAF_BUDGET, chapter_budget=CHAPTER_BUDGET):
    problems = []
    for i, ch in enumerate(layout.chapters):
        own = ch.own_end - ch.line + 1
        if own > leaf_budget:
            what = "lines before its first sub-chapter" if layout.has_subs(i) else "lines"
            problems.append(f"{ch} has {own} {what} (line {ch.line}), over the budget of "
                            f"{leaf_budget}: split it into sub-chapters")
        span = ch.end - ch.line + 1
        if layout.has_subs(i) and span > chapter_budget:
            problems.append(f"{ch} spans {span} lines (line {ch.line}), over the budget of "
                            f"{chapter_budget} for a chapter: make it two chapters")
    return problems


def check_dead_names(layout, allowed=None):
    allowed = ALLOWED_UNUSED if allowed is None else allowed
    used = set(layout.lookups)
    for use in layout.uses:
        d = layout.defs.get(use.name)
        if d is not None and not d.line <= use.line <= d.end:
            used.add(use.name)
    in_tests = set(re.findall(r"\w+", layout.tests_text))
    problems = []
    for name, d in sorted(layout.defs.items(), key=lambda item: item[1].line):
        if name in used or name in in_tests or name in MODULE_NAMES:
            if name in allowed:
                problems.append(f"{name} is in ALLOWED_UNUSED but is used now: drop it from the list")
        elif name not in allowed:
            problems.append(f"{name} (line {d.line}, {layout.name_of(layout.region(d.line))}) "
                            "is referenced nowhere in lpd.py or tests/: remove it")
    for name in sorted(set(allowed) - set(layout.defs)):
        problems.append(f"{name} is in ALLOWED_UNUSED but lpd.py no longer defines it")
    return problems


def _span_names(layout, i):
    ch = layout.chapters[i]
    return {name for name, d in layout.defs.items() if ch.line <= d.line <= ch.end}


def _matches(entry, name):
    return name.startswith(entry[:-1]) if entry.endswith("*") else name == entry


def check_provides_exist(layout):
    problems = []
    for i, ch in enumerate(layout.chapters):
        if ch.provides is None:
            problems.append(f"banner {ch} (line {ch.line}) is not followed by a "
                            "'# provides: ...' line")
            continue
        names = _span_names(layout, i)
        for entry in ch.provides:
            if not any(_matches(entry, name) for name in names):
                problems.append(f"{ch} provides {entry}, but no top-level name "
                                f"{'starting ' + entry[:-1] if entry.endswith('*') else entry} "
                                "is defined in it")
    return problems


def required_provides(layout, i):
    """What chapter i's provides line must list (see the module docstring)."""
    ch = layout.chapters[i]
    required = set()
    for name in _span_names(layout, i):
        d = layout.region(layout.defs[name].line)
        later = layout.later_regions(name)
        if d == i and later:
            required.add(name)
        elif layout.has_subs(i) and any(r > i and layout.chapters[r].line > ch.end for r in later):
            required.add(name)
    return required


def check_provides_complete(layout):
    problems = []
    for i, ch in enumerate(layout.chapters):
        if ch.provides is None:
            continue
        required = required_provides(layout, i)
        for name in sorted(required):
            if not any(_matches(entry, name) for entry in ch.provides):
                users = sorted(layout.later_regions(name))
                problems.append(f"the provides line of {ch} lacks {name}, which "
                                f"{layout.name_of(users[-1])} uses")
        names = _span_names(layout, i)
        for entry in ch.provides:
            if any(_matches(entry, n) for n in names) and \
                    not any(_matches(entry, n) for n in required):
                problems.append(f"{ch} provides {entry}, which nothing after it uses")
    return problems


def check_undefined(layout):
    known = set(layout.defs) | layout.others | MODULE_NAMES
    return sorted({f"{u.name} (line {u.line}) is not defined at top level, imported or "
                   "a builtin" for u in layout.uses if u.name not in known})


# -- lpd.py ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lpd():
    return lpd_layout()


def _ok(problems):
    assert not problems, "\n".join(problems)


def test_chapters_are_numbered_in_order(lpd):
    _ok(check_numbering(lpd))


def test_docstring_index_is_the_banners(lpd):
    _ok(check_index(lpd))


def test_no_name_is_used_before_its_chapter(lpd):
    _ok(check_order(lpd))


def test_chapters_within_size_budget(lpd):
    _ok(check_sizes(lpd))


def test_no_dead_names(lpd):
    _ok(check_dead_names(lpd))


def test_provides_names_exist(lpd):
    _ok(check_provides_exist(lpd))


def test_provides_is_what_later_chapters_use(lpd):
    _ok(check_provides_complete(lpd))


def test_no_undefined_names(lpd):
    _ok(check_undefined(lpd))


# -- each check catches what it is for --------------------------------------------------

GOOD = '''"""A module laid out as lpd.py is.

Chapters:
  1 One
  2 Two
    2.1 Two, first part
    2.2 Two, second part
  3 Three
"""
import os

##########
# 1 One ####
##########
# provides: A,
#   helper

A = 1
B = A + 1                       # used only here, at import: not provided


def helper():
    return later_in_one() + B   # a function body: the order within 1 is free


def later_in_one():
    return os.sep


##########
# 2 Two ####
##########
# provides: Thing


# 2.1 Two, first part ####
# provides: make

def make():
    return helper() + A


# 2.2 Two, second part ####
# provides: Thing

class Thing:
    size = make()


##########
# 3 Three ####
##########
# provides: -

if __name__ == "__main__":
    print(Thing.size)
'''


def _layout(text, tests_text=""):
    return Layout(text, tests_text)


def _with(old, new, text=GOOD):
    assert text.count(old) == 1, old
    return text.replace(old, new)


def test_the_good_module_passes_every_check():
    good = _layout(GOOD)
    for check in (check_numbering, check_index, check_order, check_sizes, check_dead_names,
                  check_provides_exist, check_provides_complete, check_undefined):
        problems = check(good) if check is not check_dead_names else check(good, allowed={})
        assert problems == [], (check.__name__, problems)


def test_numbering_catches_a_skipped_number():
    problems = check_numbering(_layout(_with("# 2.2 Two, second part", "# 2.3 Two, second part")))
    assert problems == ["line 43: banner 2.3 Two, second part should be numbered 2.2"]


def test_index_catches_a_banner_it_lacks():
    problems = check_index(_layout(_with("    2.2 Two, second part\n", "")))
    assert problems == ["banner '2.2 Two, second part' is missing from the docstring's index"]


def test_index_catches_a_renamed_chapter():
    problems = check_index(_layout(_with("  1 One\n", "  1 Uno\n")))
    assert "docstring index line '1 Uno' has no banner" in problems


def test_order_catches_a_use_in_an_earlier_chapter():
    text = _with("    return later_in_one() + B", "    return later_in_one() + B + len(Thing.__name__)")
    problems = check_order(_layout(text))
    assert len(problems) == 1 and problems[0].startswith(
        "Thing is used in 1 One (line 23) but defined later, in 2.2 Two, second part"), problems


def test_order_catches_a_use_in_an_earlier_sub_chapter_even_in_a_function():
    text = _with("    return helper() + A", "    return helper() + A + Thing.size")
    problems = check_order(_layout(text))
    assert len(problems) == 1 and problems[0].startswith(
        "Thing is used in 2.1 Two, first part"), problems


def test_order_catches_an_import_time_use_before_the_definition():
    text = _with("B = A + 1 ", "B = A + later_in_one.__code__.co_argcount + 1 ")
    problems = check_order(_layout(text))
    assert problems == ["later_in_one is used at import time on line 19 of 1 One, before its "
                        "definition on line 26"], problems


def test_order_sees_through_a_local_that_shadows_a_later_name():
    # A parameter named like a later top-level name is not a use of it.
    text = _with("def helper():\n", "def helper(Thing=0):\n")
    assert check_order(_layout(text)) == []


def test_sizes_catch_a_long_chapter():
    problems = check_sizes(_layout(GOOD), leaf_budget=12, chapter_budget=100)
    assert len(problems) == 1 and problems[0].startswith("1 One has 18 lines"), problems
    problems = check_sizes(_layout(GOOD), leaf_budget=100, chapter_budget=15)
    assert len(problems) == 1 and problems[0].startswith("2 Two spans 20 lines"), problems


def test_dead_names_catch_an_unused_name():
    text = _with("A = 1\n", "A = 1\nUNUSED = 2\n")
    assert check_dead_names(_layout(text), allowed={}) == [
        "UNUSED (line 19, 1 One) is referenced nowhere in lpd.py or tests/: remove it"]


def test_dead_names_count_tests_and_the_allow_list_but_not_self_reference():
    text = _with("A = 1\n", "A = 1\n\n\ndef recursive():\n    return recursive()\n")
    assert check_dead_names(_layout(text), allowed={})[0].startswith("recursive (line 21")
    assert check_dead_names(_layout(text, "lpd.recursive()"), allowed={}) == []
    assert check_dead_names(_layout(text), allowed={"recursive": "why"}) == []
    assert check_dead_names(_layout(GOOD), allowed={"A": "why"}) == [
        "A is in ALLOWED_UNUSED but is used now: drop it from the list"]


def test_provides_catch_a_name_that_does_not_exist():
    problems = check_provides_exist(_layout(_with("# provides: make", "# provides: make, mkae")))
    assert problems == ["2.1 Two, first part provides mkae, but no top-level name mkae is "
                        "defined in it"]
    problems = check_provides_exist(_layout(_with("# provides: make", "# provides: make, Z*")))
    assert problems == ["2.1 Two, first part provides Z*, but no top-level name starting Z is "
                        "defined in it"]


def test_provides_catch_a_missing_line():
    problems = check_provides_exist(_layout(_with("# provides: make\n", "")))
    assert problems == ["banner 2.1 Two, first part (line 36) is not followed by a "
                        "'# provides: ...' line"]


def test_provides_catch_a_name_left_out_or_not_used_later():
    problems = check_provides_complete(_layout(_with("# provides: A,\n#   helper", "# provides: A")))
    assert problems == ["the provides line of 1 One lacks helper, which 2.1 Two, first part uses"]
    problems = check_provides_complete(_layout(_with("# provides: A,\n#   helper", "# provides: A, B,\n#   helper")))
    assert problems == ["1 One provides B, which nothing after it uses"]
    # A chapter with sub-chapters provides what later chapters use, not what its parts share.
    problems = check_provides_complete(_layout(_with("# provides: Thing\n\n\n", "# provides: Thing, make\n\n\n")))
    assert problems == ["2 Two provides make, which nothing after it uses"]


def test_undefined_catches_a_name_that_is_gone():
    problems = check_undefined(_layout(_with("    return helper() + A", "    return helper() + A + gone()")))
    assert problems == ["gone (line 40) is not defined at top level, imported or a builtin"]
