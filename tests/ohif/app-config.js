/** OHIF Viewer configuration for tests/test_viewer_ohif.py.
 *
 * The test serves OHIF's prebuilt dist (tests/install-ohif.sh) and proxies /dicom-web to its own
 * Orthanc on the same origin, so every DICOMweb root is the page's own origin: no CORS, and no
 * request leaves the machine. Settings follow Orthanc's DICOMweb plugin (no includefield in QIDO,
 * no fuzzy matching, bulk data resolved against the study URL).
 */
window.config = {
  name: 'headscreen-test',
  routerBasename: '/',
  extensions: [],
  modes: [],
  // No onboarding tour: its pop-ups would cover the viewport the test reads.
  customizationService: [{ 'ohif.tours': { $set: [] } }],
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'headscreen test Orthanc',
        name: 'orthanc',
        wadoUriRoot: window.location.origin + '/dicom-web',
        qidoRoot: window.location.origin + '/dicom-web',
        wadoRoot: window.location.origin + '/dicom-web',
        qidoSupportsIncludeField: false,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        dicomUploadEnabled: false,
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
  // OHIF calls this for every failed image load, a request it cancelled itself included (a
  // viewport switched to another series); without it OHIF throws and shows "Something went wrong".
  // The test asserts no DICOMweb request failed.
  httpErrorHandler: error => {
    console.warn('headscreen-test: image load failed', error && error.status);
  },
};
