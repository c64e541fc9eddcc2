"""bin/pfrest-soak, briefly: good and hostile clients against `pfrest serve` while the backend flaps,
and not one wrong answer."""

import re
import subprocess
import sys

from conftest import ROOT


def test_soak_smoke():
    proc = subprocess.run([sys.executable, f"{ROOT}/bin/pfrest-soak", "--seconds", "3", "--seed", "5"],
                          capture_output=True, text=True, timeout=90, cwd=ROOT)
    out = proc.stdout
    assert proc.returncode == 0 and out.rstrip().endswith("result:                 PASS"), out + proc.stderr
    assert re.search(r"^wrong answers: +0$", out, re.M)
    assert re.search(r"^unanswered or dropped: +0$", out, re.M)
    answered = int(re.search(r"^requests answered: +(\d+) \(tcp (\d+), socketmap (\d+), policy (\d+)\)", out,
                             re.M).group(1))
    assert answered > 300
    assert re.search(r"^hostile conversations: +[1-9]\d* cases \(0 not as expected", out, re.M)
    assert re.search(r"other growth (0|-\d+)\)$", out, re.M)  # no descriptor leaked
