"""The forecast as the dry run prints it: the step times, one line per study, one total line."""

from __future__ import annotations

from medpeft_ray.search.forecast.estimate import SearchForecast


def forecast_lines(forecast: SearchForecast) -> list[str]:
    """The forecast as text: the step times, one line per study, one total line."""
    out = []
    for t in forecast.timings:
        fast, slow = t.spread()
        sampling = ""
        if forecast.fid_images is not None and t.sample_s:
            sampling = (f"{t.sampling_s(forecast.fid_images, t.eval_batch):.2f} s per FID sampling "
                        f"({forecast.fid_images} images, {forecast.fid_steps} steps); ")
        out.append(f"  {t.method}: {1000 * t.train_median_s:.1f} ms per training step (micro-batch {t.micro_batch}), "
                   f"{1000 * t.eval_median_s:.1f} ms per evaluation batch ({t.eval_batch}); {sampling}"
                   f"steps {fast:.2f}x..{slow:.2f}x of the median")
    for s in forecast.studies:
        fid = ""
        if s.fid_epochs:
            fid = (f"FID at epoch{'s' if len(s.fid_epochs) > 1 else ''} {', '.join(map(str, s.fid_epochs))} "
                   f"({s.fid_runs:.1f} samplings {s.epochs_reading}, {s.fid_s:.2f} s each), ")
        out.append(
            f"label ratio {s.label_ratio:g}: {s.trials} trials, {s.epochs:.1f} epochs {s.epochs_reading} "
            f"(of {s.trials * s.max_epochs} without stopping), {s.train_steps_per_epoch} steps + "
            f"{s.eval_batches_per_epoch} eval batches per epoch ({s.epoch_s:.1f} s), {fid}"
            f"{forecast.startup.per_trial_s:.1f} s start-up per trial; {s.device_hours:.3f} device-hours, "
            f"wall {_duration(s.wall_s)} ({_duration(s.wall_low_s)}..{_duration(s.wall_high_s)})"
        )
    point, low, high = forecast.wall_s
    out.append(
        f"total: {forecast.trials} trials, {forecast.epochs:.1f} epochs, executor set-up "
        f"{forecast.startup.executor_setup_s:.0f} s once; {forecast.device_hours:.3f} device-hours "
        f"({forecast.devices_per_trial:g} {forecast.device} per trial), wall {_duration(point)} "
        f"({_duration(low)}..{_duration(high)}) at {forecast.concurrency} concurrent trial(s)"
        + ("" if forecast.price is None else
           f"; cost {forecast.price * forecast.device_hours:,.2f} at {forecast.price:g} per device-hour")
    )
    return out


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
