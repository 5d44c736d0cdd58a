"""A script for the embedded Calc-X task: the right calculation half the time (seeded per
choice, so groups have both outcomes), else a wrong one."""

import random
import re


def reply(req):
    numbers = re.findall(r"\d+", req.last_user)
    if len(numbers) >= 2 and random.Random(req.seed).random() < 0.5:
        op = "+" if "more" in req.last_user or "new" in req.last_user else "-"
        return f"{numbers[0]} {op} {numbers[1]}"
    return "1 + 1"
