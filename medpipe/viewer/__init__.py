"""The viewer stack (`medpipe viewer`): Orthanc with its DICOMweb plugin as the archive, the node (`medpipe serve`)
sending its DICOM-SEG and SRs there, and OHIF v3 served beside Orthanc's `/dicom-web/` from one loopback origin.
See docs/viewer.md."""
