"""The dataset formats; importing this package registers each one by name."""

from distill.data.formats import coco, labelme, mask_folder, merged

__all__ = ["coco", "labelme", "mask_folder", "merged"]
