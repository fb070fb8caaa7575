package negation_test

import data.negation

test_in_set_missing_is_undefined { not negation.in_set with input as {} }

test_in_set_other_value { negation.in_set with input as {"x": "b"} }

test_key_absent_missing_is_undefined { not negation.key_absent with input as {} }

test_key_absent_unknown_key { negation.key_absent with input as {"missing": "b"} }

test_no_prefix_missing_is_undefined { not negation.no_prefix with input as {} }

test_plain_not_of_missing_is_true { negation.plain with input as {} }
