"""Teachers: models that turn images into per-pixel vessel logits, chosen by name.

    from distill.teachers import create_teacher, list_teachers
    teacher = create_teacher("frangi", sigmas=(1, 2, 3))

Each teacher module registers itself with `@register_teacher("name")`; importing this package
imports them all, so the registry is complete.
"""

from distill.teachers.base import Teacher, create_teacher, list_teachers, register_teacher, teacher_factory

__all__ = ["Teacher", "create_teacher", "list_teachers", "register_teacher", "teacher_factory"]
