package casf_test

import rego.v1

import data.casf

base(tool, effect, role, mode) := {
	"tool": tool,
	"effect": effect,
	"mode": mode,
	"role": role,
	"subject": {"patient_id": "p1"},
	"args": {},
	"context": {"tenant_id": "t1"},
	"principal": {"id": "u1", "role": role, "tenant": "t1", "auth": "api_key"},
	"request": {"method": "GET", "path": "/", "route": "/"},
}

test_receptionist_lists_appointments if {
	casf.allow with input as base("cliniccloud.list_appointments", "read", "receptionist", "ALLOW")
}

test_billing_cannot_list_appointments if {
	not casf.allow with input as base("cliniccloud.list_appointments", "read", "billing", "ALLOW")
	"Role_NotPermitted" in casf.violations with input as base("cliniccloud.list_appointments", "read", "billing", "ALLOW")
}

test_receptionist_creates_appointment if {
	casf.allow with input as base("cliniccloud.create_appointment", "write", "receptionist", "ALLOW")
}

test_nurse_cannot_create_appointment if {
	not casf.allow with input as base("cliniccloud.create_appointment", "write", "nurse", "ALLOW")
}

test_doctor_cancels_appointment if {
	casf.allow with input as base("cliniccloud.cancel_appointment", "write", "doctor", "ALLOW")
}

test_custodian_cancels_appointment if {
	casf.allow with input as base("cliniccloud.cancel_appointment", "write", "custodian", "ALLOW")
}

test_custodian_cannot_create_appointment if {
	not casf.allow with input as base("cliniccloud.create_appointment", "write", "custodian", "ALLOW")
}

test_doctor_reads_history if {
	casf.allow with input as base("cliniccloud.summary_history", "read", "doctor", "ALLOW")
}

test_receptionist_cannot_read_history if {
	"Role_NotPermitted" in casf.violations with input as base("cliniccloud.summary_history", "read", "receptionist", "ALLOW")
}

test_history_needs_patient if {
	inp := object.remove(base("cliniccloud.summary_history", "read", "doctor", "ALLOW"), {"subject"})
	not casf.allow with input as inp
	"BadRequest_MissingPatientId" in casf.violations with input as inp
}

test_nurse_sends_sms if {
	casf.allow with input as base("twilio.send_sms", "write", "nurse", "ALLOW")
}

test_billing_cannot_send_sms if {
	not casf.allow with input as base("twilio.send_sms", "write", "billing", "ALLOW")
}

test_billing_generates_invoice if {
	casf.allow with input as base("stripe.generate_invoice", "write", "billing", "ALLOW")
}

test_doctor_cannot_generate_invoice if {
	not casf.allow with input as base("stripe.generate_invoice", "write", "doctor", "ALLOW")
}

test_reads_allowed_in_read_only if {
	casf.allow with input as base("cliniccloud.list_appointments", "read", "nurse", "READ_ONLY")
}

test_writes_denied_in_read_only if {
	inp := base("cliniccloud.create_appointment", "write", "receptionist", "READ_ONLY")
	not casf.allow with input as inp
	"Mode_ReadOnly_NoWrite" in casf.violations with input as inp
	not casf.needs_approval with input as inp
}

test_everything_denied_in_kill_switch if {
	inp := base("cliniccloud.list_appointments", "read", "receptionist", "KILL_SWITCH")
	not casf.allow with input as inp
	"Mode_KillSwitch" in casf.violations with input as inp
}

test_step_up_write_needs_approval if {
	inp := base("cliniccloud.create_appointment", "write", "receptionist", "STEP_UP")
	not casf.allow with input as inp
	casf.needs_approval with input as inp
	count(casf.violations) == 0 with input as inp
}

test_step_up_write_with_an_approval_is_allowed if {
	inp := object.union(base("cliniccloud.create_appointment", "write", "receptionist", "STEP_UP"),
		{"approval": {"id": "apr_x", "status": "approved", "approvers": ["u2"], "approved_at": "t"}})
	casf.allow with input as inp
	not casf.needs_approval with input as inp
}

test_step_up_write_with_a_pending_approval_still_needs_one if {
	inp := object.union(base("cliniccloud.create_appointment", "write", "receptionist", "STEP_UP"),
		{"approval": {"id": "apr_x", "status": "pending"}})
	not casf.allow with input as inp
	casf.needs_approval with input as inp
}

test_an_approval_does_not_lift_read_only if {
	inp := object.union(base("cliniccloud.create_appointment", "write", "receptionist", "READ_ONLY"),
		{"approval": {"id": "apr_x", "status": "approved", "approvers": ["u2"], "approved_at": "t"}})
	not casf.allow with input as inp
}

test_an_approval_does_not_lift_a_role if {
	inp := object.union(base("stripe.generate_invoice", "write", "nurse", "STEP_UP"),
		{"approval": {"id": "apr_x", "status": "approved", "approvers": ["u2"], "approved_at": "t"}})
	not casf.allow with input as inp
}

test_step_up_read_allowed if {
	inp := base("cliniccloud.list_appointments", "read", "receptionist", "STEP_UP")
	casf.allow with input as inp
	not casf.needs_approval with input as inp
}

test_step_up_forbidden_write_is_denied_not_approval if {
	inp := base("stripe.generate_invoice", "write", "nurse", "STEP_UP")
	not casf.needs_approval with input as inp
	"Role_NotPermitted" in casf.violations with input as inp
}

test_missing_tenant_denied if {
	inp := object.remove(base("cliniccloud.list_appointments", "read", "nurse", "ALLOW"), {"context"})
	not casf.allow with input as inp
	"BadRequest_MissingTenantId" in casf.violations with input as inp
}

test_unknown_role_denied if {
	inp := base("cliniccloud.list_appointments", "read", "janitor", "ALLOW")
	not casf.allow with input as inp
	"BadRequest_UnknownRole" in casf.violations with input as inp
}

test_unknown_tool_denied if {
	inp := base("unknown.tool", "read", "doctor", "ALLOW")
	not casf.allow with input as inp
	"Tool_Unknown" in casf.violations with input as inp
}

# ------------------------------------------------------------ tools/list

listing(tool, effect, role) := object.union(base(tool, effect, role, "ALLOW"), {
	"subject": {},
	"args": {},
	"request": {"method": "POST", "path": "/mcp", "route": "/mcp"},
})

test_receptionist_sees_exactly_its_tools if {
	shown := {t |
		some t, _ in casf.permitted
		casf.visible with input as listing(t, "read", "receptionist")
	}
	shown == {
		"cliniccloud.list_appointments", "cliniccloud.create_appointment",
		"cliniccloud.cancel_appointment", "twilio.send_sms",
	}
}

test_billing_sees_only_invoices if {
	shown := {t |
		some t, _ in casf.permitted
		casf.visible with input as listing(t, "write", "billing")
	}
	shown == {"stripe.generate_invoice"}
}

test_nurse_sees_history_but_not_invoices if {
	casf.visible with input as listing("cliniccloud.summary_history", "read", "nurse")
	not casf.visible with input as listing("stripe.generate_invoice", "write", "nurse")
}

test_unknown_tool_is_not_visible if {
	not casf.visible with input as listing("acme.unknown", "read", "doctor")
}

test_unknown_role_sees_nothing if {
	not casf.visible with input as listing("cliniccloud.list_appointments", "read", "intern")
}

test_visible_ignores_the_mode if {
	casf.visible with input as object.union(
		listing("cliniccloud.create_appointment", "write", "doctor"),
		{"mode": "READ_ONLY"},
	)
}
