# MCP example policy (Rego v1): the clinic example's policy, plus `visible`
# for tools/list. Query: data.casf; list query: data.casf.visible.
# Input: contract §4 (tool, effect, mode, role, subject, args, context, principal, request).
package casf

import rego.v1

default allow := false

default needs_approval := false

known_roles := {"receptionist", "nurse", "doctor", "billing", "custodian"}

# Which roles may use which tool.
permitted := {
	"cliniccloud.list_appointments": {"receptionist", "nurse", "doctor", "custodian"},
	"cliniccloud.create_appointment": {"receptionist", "doctor"},
	"cliniccloud.cancel_appointment": {"receptionist", "doctor"},
	"cliniccloud.summary_history": {"nurse", "doctor"},
	"twilio.send_sms": {"receptionist", "nurse"},
	"stripe.generate_invoice": {"billing"},
}

# Tools that act on one patient and need subject.patient_id.
needs_subject := {"cliniccloud.summary_history", "twilio.send_sms"}

is_write if input.effect == "write"

has_tenant if {
	is_string(input.context.tenant_id)
	input.context.tenant_id != ""
}

has_subject if {
	is_string(input.subject.patient_id)
	input.subject.patient_id != ""
}

subject_ok if not input.tool in needs_subject

subject_ok if has_subject

mode_permits if input.mode == "ALLOW"

mode_permits if {
	input.mode in {"STEP_UP", "READ_ONLY"}
	not is_write
}

role_permitted if input.role in permitted[input.tool]

violations contains "BadRequest_UnknownRole" if not input.role in known_roles

violations contains "BadRequest_MissingTenantId" if not has_tenant

violations contains "BadRequest_MissingPatientId" if not subject_ok

violations contains "Tool_Unknown" if not permitted[input.tool]

violations contains "Role_NotPermitted" if {
	permitted[input.tool]
	input.role in known_roles
	not role_permitted
}

violations contains "Mode_ReadOnly_NoWrite" if {
	input.mode == "READ_ONLY"
	is_write
}

violations contains "Mode_KillSwitch" if input.mode == "KILL_SWITCH"

# Everything but the mode is in order.
eligible if {
	role_permitted
	has_tenant
	subject_ok
	count(violations) == 0
}

allow if {
	eligible
	mode_permits
}

# STEP_UP: writes that would otherwise pass need a human approval.
needs_approval if {
	eligible
	input.mode == "STEP_UP"
	is_write
}

# tools/list: a caller is shown exactly the tools its role may use (the mode
# and the subject are decided when the tool is called, not when it is listed).
# Input: the policy input of a call of that tool without arguments.
default visible := false

visible if role_permitted
