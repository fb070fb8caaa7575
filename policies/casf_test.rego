package casf_test

import rego.v1

import data.casf

req(tool, effect, role, mode) := {"tool": tool, "effect": effect, "role": role, "mode": mode}

test_viewer_reads if casf.allow with input as req("example.read_items", "read", "viewer", "ALLOW")

test_viewer_cannot_write if {
	inp := req("example.update_item", "write", "viewer", "ALLOW")
	not casf.allow with input as inp
	"Role_NotPermitted" in casf.violations with input as inp
}

test_editor_writes if casf.allow with input as req("example.update_item", "write", "editor", "ALLOW")

test_unknown_tool_denied if {
	inp := req("other.tool", "read", "editor", "ALLOW")
	not casf.allow with input as inp
	"Tool_Unknown" in casf.violations with input as inp
}

test_read_only_blocks_writes if {
	inp := req("example.update_item", "write", "editor", "READ_ONLY")
	not casf.allow with input as inp
	"Mode_ReadOnly_NoWrite" in casf.violations with input as inp
}

test_read_only_allows_reads if casf.allow with input as req("example.read_items", "read", "viewer", "READ_ONLY")

test_step_up_write_needs_approval if {
	inp := req("example.update_item", "write", "editor", "STEP_UP")
	not casf.allow with input as inp
	casf.needs_approval with input as inp
}

test_kill_switch_denies if not casf.allow with input as req("example.read_items", "read", "viewer", "KILL_SWITCH")
