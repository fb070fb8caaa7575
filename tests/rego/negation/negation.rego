# Negation over a value that may be missing, as OPA evaluates it: the operands
# of `not` are evaluated first, so a missing one leaves the rule undefined.
package negation

import rego.v1

obj := {"a": 1}

blocked := {"mallory"}

in_set if not input.x in {"a"}

key_absent if not obj[input.missing]

no_prefix if not startswith(input.missing, "a")

default allow := false

allow if not input.args.user in blocked

# nothing to move out of these: the `not` sees the missing value itself
plain if not input.x

not_equal if not input.x == "a"
