"""Teacher roles. A recipe's `teacher:` section is the primary role; `teachers.<role>:` adds more."""

PRIMARY_TEACHER = "teacher"
