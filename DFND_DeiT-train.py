"""Probe distillation, the published command: see distill.py for the flags and what it writes.

    python DFND_DeiT-train.py --dataset cifar10 --data_cifar $root_cifar10 --data_imagenet $root_wild \
        --num_select 650000 --teacher_dir $teacher_cifar10 --selected_file $selected_cifar10 \
        --output_dir $output_student_cifar10 --nb_classes 10 --lr_S 7.5e-4 --attnprobe_sel --attnprobe_dist
"""
import distill

if __name__ == "__main__":
    distill.main(distill.get_args_parser().parse_args())
