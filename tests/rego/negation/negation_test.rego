package negation_test

import data.negation
import rego.v1

test_in_set_missing_is_undefined if not negation.in_set with input as {}

test_in_set_other_value if negation.in_set with input as {"x": "b"}

test_in_set_member if not negation.in_set with input as {"x": "a"}

test_key_absent_missing_is_undefined if not negation.key_absent with input as {}

test_key_absent_unknown_key if negation.key_absent with input as {"missing": "b"}

test_no_prefix_missing_is_undefined if not negation.no_prefix with input as {}

test_no_prefix_other if negation.no_prefix with input as {"missing": "b"}

test_missing_user_is_denied if not negation.allow with input as {"args": {}}

test_blocked_user_is_denied if not negation.allow with input as {"args": {"user": "mallory"}}

test_other_user_is_allowed if negation.allow with input as {"args": {"user": "bob"}}

test_plain_not_of_missing_is_true if negation.plain with input as {}

test_not_equal_of_missing_is_true if negation.not_equal with input as {}
