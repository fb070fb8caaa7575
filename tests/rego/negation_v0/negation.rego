# The same in Rego v0 syntax (casf-proxy policy test --v0-compatible).
package negation

import future.keywords.in

obj := {"a": 1}

in_set { not input.x in {"a"} }

key_absent { not obj[input.missing] }

no_prefix { not startswith(input.missing, "a") }

plain { not input.x }
