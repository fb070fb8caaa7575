# Starter policy for casf-proxy (Rego v1). Query: data.casf.
#
# Deny by default. Permissions come from a table of tool -> roles; edit it, or
# replace this file with your own policy. The result must be
#   allow: bool, violations: set of strings, needs_approval: bool (optional).
package casf

import rego.v1

default allow := false

default needs_approval := false

# tool -> roles allowed to call it. Unlisted tools are denied.
permissions := {"example.read_items": {"viewer", "editor"}, "example.update_item": {"editor"}}

is_write if input.effect == "write"

role_permitted if input.role in permissions[input.tool]

violations contains "Tool_Unknown" if not permissions[input.tool]

violations contains "Role_NotPermitted" if {
	permissions[input.tool]
	not role_permitted
}

violations contains "Mode_ReadOnly_NoWrite" if {
	input.mode in {"READ_ONLY", "KILL_SWITCH"}
	is_write
}

violations contains "Mode_KillSwitch" if input.mode == "KILL_SWITCH"

clean if {
	role_permitted
	count(violations) == 0
}

allow if {
	clean
	input.mode in {"ALLOW", "STEP_UP", "READ_ONLY"}
	not step_up_write
}

step_up_write if {
	input.mode == "STEP_UP"
	is_write
}

# Writes in STEP_UP need a human approval.
needs_approval if {
	clean
	step_up_write
}
